"""Several worker processes serving the same ports: ``workers = N``.

``twistd -n chatserver`` with ``workers > 1`` runs a small supervisor
(``supervisor``) and N workers (``worker``), each a full chat server instance
with its own store pool and broker connections; messages between workers go
over the broker exactly as between hosts. That is why more than one worker
needs Redis (``redis_url`` or ``redis_cluster``) and Postgres: SQLite belongs
to one process. Database connections: workers x db_pool_size.

The modules, one job each:

- ``listen``: sockets the workers share (SO_REUSEPORT), which endpoint kinds can be;
- ``spec``: what the supervisor tells a worker (the config, as JSON on stdin);
- ``supervisor``: starts, relays the logs of, restarts and stops the workers;
- ``worker``: a worker process's entry point; ``service``: its service tree;
- ``process``: signals, the open-files limit, dying with the supervisor;
- ``channel``: the private Unix-socket channel between the processes;
- ``whole``: /healthz, /readyz and /metrics answered for the whole server;
- ``aggregate``: how the processes' metrics are merged;
- ``logrelay``: workers' log events into the supervisor's log.
"""
