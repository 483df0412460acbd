# Helpers the benchmark scripts share; sourced (from the repository root) by each of them.

# A TCP port free on 127.0.0.1 right now (the kernel picks it; a race with another process taking it
# before the server binds is possible but has not been seen here).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
