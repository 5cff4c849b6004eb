# Functions of tools/cluster/slurm_up.sh, in a file of their own so that tests/test_slurm_up_safety.py can run
# them on scratch folders (a fake apt-get, a planted symlink, a foreign configuration) without touching the
# running cluster. Sourced, never run. Uses: STARTED (daemons started so far), SCRIPT_DIR (slurm_down.sh's).

MARKER="# Written by tools/cluster/slurm_up.sh"
SLURM_PORTS=(6817 6818 6819)  # slurmctld, slurmd, slurmdbd
CHANGED=" "
STARTED=()

say() { echo "slurm_up: $*"; }
fail() {
    echo "slurm_up: FAILED: $*" >&2
    if ((${#STARTED[@]})); then bash "$SCRIPT_DIR/slurm_down.sh" "${STARTED[@]}" >/dev/null 2>&1 || true; fi
    exit 1
}

# install_packages PACKAGE...: apt-get update and install, their output in a new private log file
# (mktemp: a fresh name, created 0600 with O_EXCL, so a file or link planted in /tmp is never followed).
# The log is named on failure and removed on success.
install_packages() {
    local log
    log=$(mktemp "${TMPDIR:-/tmp}/slurm_up.apt.XXXXXXXXXX") || fail "cannot create a log file in ${TMPDIR:-/tmp}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >>"$log" 2>&1 || fail "apt-get update (see $log)"
    apt-get install -y -qq --no-install-recommends "$@" >>"$log" 2>&1 || fail "apt-get install $* (see $log)"
    rm -f "$log"
}

# write_conf FILE OWNER MODE: stdin becomes FILE when it differs (the new file is renamed into place, so a
# reader never sees half of it). A FILE this script did not write (no MARKER line) is refused unless FORCE=1.
# The FILE replaced is kept beside it as FILE.bak-YYYYmmdd-HHMMSS (named in one line). The name joins CHANGED.
write_conf() {
    local file=$1 owner=$2 mode=$3 tmp backup
    tmp=$(mktemp "$(dirname "$file")/.$(basename "$file").XXXXXX") || fail "cannot write in $(dirname "$file")"
    cat >"$tmp"
    if [[ -f $file ]] && cmp -s "$tmp" "$file"; then
        rm -f "$tmp"
        return 0
    fi
    if [[ -e $file || -L $file ]]; then
        if [[ ${FORCE:-0} != 1 ]] && ! grep -q "^$MARKER" "$file" 2>/dev/null; then
            rm -f "$tmp"
            fail "$file exists and was not written by this script (no '$MARKER' line): it is left as it is." \
                 "Move it away, or run again with --force to replace it (a copy is kept as $file.bak-DATE)"
        fi
        backup="$file.bak-$(date +%Y%m%d-%H%M%S)"
        [[ -e $backup ]] && backup=$(mktemp "$backup.XXXX")
        cp -p --remove-destination "$file" "$backup" || { rm -f "$tmp"; fail "cannot keep a copy of $file as $backup"; }
        say "kept the previous $file as $backup"
    fi
    chown "$owner:$owner" "$tmp" && chmod "$mode" "$tmp" && mv -f "$tmp" "$file" \
        || { rm -f "$tmp"; fail "cannot write $file"; }
    CHANGED+="$(basename "$file") "
}

# loopback_address NAME: the IPv4 address NAME resolves to when it is a loopback one (127.x.y.z), else nothing.
loopback_address() {
    local addr
    addr=$(getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 {print $1}')
    [[ $addr == 127.* ]] && echo "$addr"
    return 0
}

# listeners PORT...: "address:port" of every TCP socket listening on one of the ports (ss, else /proc/net/tcp).
listeners() {
    local ports=" $* "
    if command -v ss >/dev/null; then
        ss -Hltn 2>/dev/null | awk -v ports="$ports" '{
            n = split($4, part, ":"); if (index(ports, " " part[n] " ")) print $4 }'
        return 0
    fi
    local file
    for file in /proc/net/tcp /proc/net/tcp6; do  # mawk has no strtonum: hex() below
        [[ -r $file ]] || continue
        awk -v ports="$ports" '
            function hex(s,  i, v) { v = 0; s = toupper(s)
                for (i = 1; i <= length(s); i++) v = v * 16 + index("0123456789ABCDEF", substr(s, i, 1)) - 1
                return v }
            NR > 1 && $4 == "0A" {
                split($2, a, ":"); port = hex(a[2])
                if (!index(ports, " " port " ")) next
                if (length(a[1]) == 8)
                    addr = hex(substr(a[1], 7, 2)) "." hex(substr(a[1], 5, 2)) "." hex(substr(a[1], 3, 2)) "." \
                           hex(substr(a[1], 1, 2))
                else addr = (a[1] == "00000000000000000000000001000000") ? "[::1]" : "[" a[1] "]"
                print addr ":" port }' "$file"
    done
}

# check_loopback_only PORT...: fail when a daemon listens on one of the ports on a non-loopback address.
check_loopback_only() {
    local outside
    outside=$(listeners "$@" | { grep -vE '^(127\.[0-9.]+|\[::1\]|localhost):' || true; } | tr '\n' ' ')
    [[ -z $outside ]] || fail "a Slurm daemon listens beyond this host: ${outside% } (ports $*; expected" \
                              "127.0.0.1 only: see CommunicationParameters in /etc/slurm/slurm.conf and slurmdbd.conf)"
}
