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

require_workdir() {  # the flags must name the run's folder: relaunching resumes it
  local arg
  for arg in "$@"; do
    case $arg in --workdir=?*) return 0 ;; esac
  done
  echo "error: pass --workdir=PATH, the run's checkpoints and results, outside the code" \
       "folder and seen by every process (one host: any folder; several: a shared file" \
       "system such as NFS or Filestore); relaunching with it resumes the run" >&2
  exit 2
}

check_settings() {  # $1: a venv; the flags are checked with its python (or python3) here,
                    # before a cluster runs them
  local python=$1/bin/python
  [ -x "$python" ] || python=python3
  shift
  if ! "$python" -c "import ntxr" 2>/dev/null; then
    echo "warning: $python has no ntxr here: the flags are checked when the run starts" >&2
    return 0
  fi
  "$python" -m ntxr.main --check_settings "$@" || exit $?
}
