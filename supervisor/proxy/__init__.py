"""Proxy: the OpenAI-compatible HTTP/1.1 front on anyio + h11 (which reads every request and
writes every response the proxy makes itself; relayed responses are framed by `relay_framing`).
It knows the running service only through the `Backends` protocol (`backends`), so it imports no
other stage.

- `server`: the listener, one loop per client connection, the relay to a child;
- `backends`: what the proxy asks of the service, and the status it renders;
- `http`: HTTP framing and the request and response rules (pure);
- `upstream`: pooled keep-alive connections to the children;
- `upstream_http`: a request's bytes and a child's response read from bytes, without h11 (pure);
- `relay_framing`: a child's response framed for the client, as h11 would, without it (pure);
- `sockets`: non-blocking sockets read as asyncio's transports read, written through anyio;
- `loop_clock`: the event loop's clock, read without anyio's per-call backend lookup;
- `access`: API keys and CORS;
- `routes`: the proxy's own routes (/health, /status, /v1/models, /metrics, admin) (pure);
- `events`: the numbered state-change log behind `GET /events`, and server-sent events' framing;
- `streams`: `GET /events` and `GET /logs/<model>` as server-sent event streams;
- `loading_notes`: SSE comments for a streaming request that waits on a model still loading;
- `ui_files`: the status page's files (`GET /ui`, from the `ui/` folder);
- `metrics`: request counters and the Prometheus exposition.

May import: schemas, errors.
"""
