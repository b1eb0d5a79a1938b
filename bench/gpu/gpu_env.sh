# Sourced by bench/gpu/gpu_check.sh and bench/gpu/gpu_scale.sh on the GPU machine: installs what the machine lacks
# from the carried wheels (.whl, made here by bench/gpu/gpu_wheels.py) and speft-ds itself, and sets PY, OUT,
# PATH and say(). Exits 3 where installing fails.
set -u
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
say() { echo "$(basename "$0" .sh): $*"; }

# The wheels name no dependencies (--no-deps): the machine's own torch and the rest stay as they are, and a
# version pin of one wheel cannot stop the install.
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --root-user-action=ignore --find-links "$WHEELS" "$WHEELS"/*.whl \
    || { say "installing the wheels in $WHEELS failed"; exit 3; }
else
  say "no wheels in $WHEELS: using the installed packages"
fi
# The machine starts bare each time; a checkout that already has the package installed keeps it.
if ! "$PY" -m pip show -q speft-ds >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps --no-build-isolation --root-user-action=ignore -e . \
    || { say "installing speft-ds failed"; exit 3; }
fi
# Where pip put the `deepspeed` launcher, which the benchmark's jobs call.
PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
"$PY" -c "import speft_ds.recipe, speft_ds.methods.lora" 2>"$OUT/import.log" \
  || { say "speft-ds does not import: $(tail -n 1 "$OUT/import.log")"; exit 3; }

