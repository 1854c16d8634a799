# Shared by the stand-ins scripts/test-gpu-check.sh runs gpu-check.sh against. Their state lies
# in $STUB_STATE: argv (one line per run of a stand-in), env (the preflight's environment),
# mem (the stub GPU's used MiB, 500 when idle) and pid (the pid the stub GPU lists).

# Appends one line to $STUB_STATE/argv: the DENSENET_* switches set to 1, then the arguments.
log_argv() {
  local var flags=
  for var in DENSENET_FORCE_NVRTC DENSENET_REQUIRE_NVRTC DENSENET_REQUIRE_PTX; do
    [ "${!var:-}" = 1 ] && flags+="$var=1 "
  done
  echo "$flags$*" >>"$STUB_STATE/argv"
}

# set_mem MIB: the stub GPU's used memory from now on (written atomically).
set_mem() {
  echo "$1" >"$STUB_STATE/mem.new"
  mv "$STUB_STATE/mem.new" "$STUB_STATE/mem"
}

# timed_window PID: a benchmark's memory over time: 99999 MiB in warm-up and after the timed
# steps, 1500 MiB over them, PID listed as a compute process meanwhile; sets START and END
# (unix seconds) around the timed steps.
# shellcheck disable=SC2034 # START and END are for the caller
timed_window() {
  echo "$1" >"$STUB_STATE/pid"
  set_mem 99999
  sleep 0.25
  set_mem 1500
  sleep 0.05
  START=$(date +%s.%N)
  sleep 0.4
  END=$(date +%s.%N)
  sleep 0.05
  set_mem 99999
  sleep 0.2
  set_mem 500
  rm -f "$STUB_STATE/pid"
}
