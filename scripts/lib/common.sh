# Helpers the benchmark scripts share; sourced (from the repository root) by each of them.

# A TCP port free on 127.0.0.1 right now (the kernel picks it; a race with another process taking it
# before the server binds is possible but has not been seen here).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits for the server at URL (no trailing slash) to answer /ready with 200; prints the seconds it
# took. Fails after 120 s.
wait_ready() {
  python3 - "$1" <<'PY'
import sys, time, urllib.request
url, t0 = sys.argv[1], time.time()
while time.time() - t0 < 120:
    try:
        if urllib.request.urlopen(url + "/ready", timeout=1).status == 200:
            break
    except Exception:
        time.sleep(0.01)
else:
    sys.exit(f"{url} was not ready after 120 s")
print(f"{time.time() - t0:.2f}")
PY
}

# Waits until URL answers HTTP at all (any status: the peers' servers have no /ready). Fails after
# 30 s.
wait_http() {
  for _ in $(seq 1 600); do curl -s -o /dev/null "$1" && return 0; sleep 0.05; done
  echo "no HTTP answer from $1 after 30 s" >&2; exit 1
}
