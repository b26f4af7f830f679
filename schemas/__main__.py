from llama_smart_proxy.schemas.generate import write_all

for path in write_all():
    print(f"wrote {path}")
