# Helpers the launch scripts source.

quote() {  # one shell word, single-quoted only when it needs to be
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {  # the arguments as one command line
  local out="" arg
  for arg in "$@"; do out+="${out:+ }$(quote "$arg")"; done
  printf '%s' "$out"
}

run() {  # runs the command, or with DRY_RUN set prints it
  if [ -n "${DRY_RUN:-}" ]; then quote_all "$@"; echo; else "$@"; fi
}
