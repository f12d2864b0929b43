# Helpers sourced by the benchmark scripts.

# wait_port PORT [TENTHS]: returns once something listens on 127.0.0.1:PORT;
# after TENTHS tenths of a second (default 100), stops the script.
wait_port() {
  for _ in $(seq "${2:-100}"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2; exit 1
}
