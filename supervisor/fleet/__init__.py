"""Fleet: several hosts, each running its own `serve`, behind one HAProxy that routes each request
to a host serving its model. Pure rendering apart from the one module that writes files and
signals HAProxy.

- `routes`: `FleetRoutes`, what HAProxy must know of the fleet (hosts, each model's names and
  hosts, the timeouts, the body limit, the health check), checked when built (pure);
- `haproxy_config`: `FleetRoutes` → the text of an HAProxy config and the error files it names (pure);
- `haproxy_reload`: write those files atomically, check them with `haproxy -c`, reload HAProxy's
  master without dropping a connection.

May import: schemas, errors, proxy (its error body shape and header limit, never its server).
"""
