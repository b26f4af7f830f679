// A dry run of llama.cpp's own allocator with llama-server's context settings.
//
// Loads the model and context with no_alloc (as llama-fit-params does: nothing is allocated, so a
// 26 GB model costs no RAM), but sets n_outputs_max the way llama-server does (n_parallel, or
// n_batch for embeddings), which llama-fit-params cannot. Prints one line per buffer type:
//   BUFFER <name> <model bytes> <context bytes> <compute bytes>
// and llama.cpp's own log (KV and RS "size =" lines) on stderr.
//
// usage: probe MODEL CTX NP KVU CTK CTV FA(on|off|auto) BATCH UBATCH EMBD(0|1) NGL [RPC,RPC TS,TS]
#include "llama.h"
#include "llama-ext.h"
#include "ggml-backend.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static ggml_type type_of(const char * name) {
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char * n = ggml_type_name((ggml_type) t);
        if (n && strcmp(n, name) == 0) {
            return (ggml_type) t;
        }
    }
    fprintf(stderr, "unknown type %s\n", name);
    exit(2);
}

static std::vector<std::string> split(const std::string & s) {
    std::vector<std::string> out;
    size_t start = 0;
    while (start <= s.size()) {
        size_t end = s.find(',', start);
        if (end == std::string::npos) end = s.size();
        out.push_back(s.substr(start, end - start));
        start = end + 1;
    }
    return out;
}

int main(int argc, char ** argv) {
    if (argc < 12) {
        fprintf(stderr, "usage: %s MODEL CTX NP KVU CTK CTV FA BATCH UBATCH EMBD NGL [RPC,RPC TS,TS]\n", argv[0]);
        return 2;
    }
    llama_backend_init();
    ggml_backend_load_all();

    std::vector<ggml_backend_dev_t> devices;
    std::vector<float> tensor_split(llama_max_devices(), 0.0f);
    if (argc >= 14) {
        ggml_backend_reg_t reg = ggml_backend_reg_by_name("RPC");
        if (!reg) { fprintf(stderr, "no RPC backend\n"); return 2; }
        typedef ggml_backend_reg_t (*add_server_t)(const char *);
        auto add_server = (add_server_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_rpc_add_server");
        for (const auto & endpoint : split(argv[12])) {
            ggml_backend_reg_t server = add_server(endpoint.c_str());
            for (size_t i = 0; i < ggml_backend_reg_dev_count(server); i++) {
                devices.push_back(ggml_backend_reg_dev_get(server, i));
            }
        }
        devices.push_back(nullptr);
        auto fractions = split(argv[13]);
        for (size_t i = 0; i < fractions.size(); i++) tensor_split[i] = atof(fractions[i].c_str());
    }

    llama_model_params mp = llama_model_default_params();
    mp.no_alloc = true;
    mp.load_mode = LLAMA_LOAD_MODE_NONE;
    mp.use_extra_bufts = false;  // -nr: no repacked copies of the weights
    mp.n_gpu_layers = atoi(argv[11]);
    if (!devices.empty()) {
        mp.devices = devices.data();
        mp.tensor_split = tensor_split.data();
    }

    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "failed to load model\n"); return 1; }

    const bool embd = atoi(argv[10]) != 0;
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = atoi(argv[2]);
    cp.n_seq_max = atoi(argv[3]);
    cp.kv_unified = atoi(argv[4]) != 0;
    cp.type_k = type_of(argv[5]);
    cp.type_v = type_of(argv[6]);
    cp.flash_attn_type = strcmp(argv[7], "on") == 0 ? LLAMA_FLASH_ATTN_TYPE_ENABLED
                       : strcmp(argv[7], "off") == 0 ? LLAMA_FLASH_ATTN_TYPE_DISABLED
                       : LLAMA_FLASH_ATTN_TYPE_AUTO;
    cp.n_batch = atoi(argv[8]);
    cp.n_ubatch = atoi(argv[9]);
    cp.embeddings = embd;
    cp.swa_full = false;  // llama-server default (llama_context_default_params says true)
    // as tools/server/server-context.cpp server_output_limits() without speculative decoding
    cp.n_outputs_max = embd ? cp.n_batch : cp.n_seq_max;
    cp.n_outputs_max_per_seq = 1;
    if (embd) cp.pooling_type = LLAMA_POOLING_TYPE_UNSPECIFIED;

    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "failed to create context\n"); return 1; }

    for (const auto & [buft, mb] : llama_get_memory_breakdown(ctx)) {
        printf("BUFFER %s %zu %zu %zu\n", ggml_backend_buft_name(buft), mb.model, mb.context, mb.compute);
    }
    fflush(stdout);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
