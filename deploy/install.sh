#!/usr/bin/env bash
# Install, update or remove the ClearIP in-line SIP proxy on a Linux host with systemd.
#
# The same script runs from the EC2 user data (infra/user_data.sh) and by hand on a plain VM
# (RHEL/Oracle Linux 8-9, Amazon Linux 2023, Debian 12). It
#   - installs python3.11, tcpdump and openssl when missing (dnf/yum or apt-get), and gcc with the
#     Python headers for the compiled core when it can (optional: without them the core is pure Python),
#   - copies the runtime to /opt/clearip-proxy/src and installs it into its own virtual environment
#     /opt/clearip-proxy/venv with only requirements-runtime.txt: from the release's hash-pinned
#     wheels (wheels/<arch>/, requirements-runtime.lock) with no package index when they are there,
#   - builds the proxy's wheel in a throw-away build venv (setuptools and mypy, whose mypyc compiles
#     the sans-I/O core to C: requirements-build.lock) and installs that wheel; when the compile
#     cannot run (no gcc or headers, --core pure) the same wheel is pure Python, and the log says which
#     build runs (`clearip-proxy --version`: "core compiled" or "core pure"),
#   - writes /etc/clearip-proxy/settings.toml from a site settings file and the arguments with
#     `clearip-proxy settings write`: the proxy's own code validates every value (CIDRs, the ClearIP
#     URI's transport, ...) and says whether the running proxy takes the change by reload or restart,
#   - creates a self-signed TLS certificate for the 5061 listener when none exists (replace it with
#     your own: /etc/clearip-proxy/tls/cert.pem and key.pem; the script never overwrites them),
#   - installs and starts the systemd unit clearip-proxy.service; on a later run it reloads the proxy
#     (SIGHUP) when only reloadable settings changed, restarts it (SIGTERM drains calls first) when
#     the release or a restart-only setting changed, and waits until it listens again,
#   - opens 5060/udp, 5060/tcp and 5061/tcp to the trusted CIDRs only (firewalld when it runs,
#     else nftables).
# It is idempotent: a second run with the same arguments changes nothing and says "unchanged".
# The EC2 user data (first boot) and the stack's release association (every later `cdk deploy`) run
# this same script from the release they install.
#
# Usage: install.sh --allow CIDR [--allow CIDR ...] [options]
#        install.sh --uninstall [--root DIR]
# Run with --help for the options.
set -euo pipefail

PREFIX=/opt/clearip-proxy
CONF_DIR=/etc/clearip-proxy
UNIT_DIR=/etc/systemd/system
UNIT=clearip-proxy.service
SERVICE_USER=clearip-proxy
FW_ZONE=clearip-sip

ROOT=''
SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ALLOW=()
ADVERTISE=''
TIMEOUT=''
CLEARIP_URI=''
TRANSPORT=''
PROXY_ID=''
METRICS=''
REGION=''
PYTHON=''
SITE=''
RELEASE_ID=''
WHEELS=''
OFFLINE=0
SERVICE='auto'
WAIT=120
SKIP_VENV=0
PACKAGES=1
FIREWALL='auto'
UNINSTALL=0
KEEP_CONFIG=0
CHANGES=0
CORE=''

usage() {
  cat <<'USAGE'
Usage: install.sh --allow CIDR [--allow CIDR ...] [options]
       install.sh --settings SITE.toml [options]
       install.sh --uninstall [--keep-config] [--root DIR]

  --allow CIDR[,CIDR]      trusted switch/carrier networks (required unless --settings names them;
                           repeatable; a prefix is required, 0.0.0.0/0 and ::/0 are refused)
  --settings FILE          site settings (flat TOML of the proxy's settings, no host fields such as
                           advertise or proxy_id): the stack renders it; flags given here win
  --advertise ADDR|imds    public address for 1:1 NAT (Via, Record-Route, Contact); "imds" reads
                           the instance's public IPv4 (Elastic IP) from EC2 metadata with IMDSv2
  --timeout SECONDS        ClearIP answer timeout, > 0 and <= 60 (default 5)
  --clearip-uri URI        ClearIP next hop (default sip:sip.clearip.com:5061;transport=tls)
  --clearip-transport T    tls or tcp: rewrites the URI's transport (5061 <-> 5060 follows)
  --proxy-id ID|imds       metric dimension; "imds" = EC2 instance id (default: host name)
  --metrics SINK           auto, cloudwatch, log or off (default auto)
  --aws-region REGION|imds region for CloudWatch, written to /etc/clearip-proxy/environment
  --python PATH            interpreter for the venv (default python3.11, else python3 >= 3.11)
  --core MODE              auto, compiled or pure: the proxy's sans-I/O core compiled to C by mypyc
                           at install time (auto: when gcc and the Python headers are there, else
                           pure Python; compiled: fail without them; pure: never compile). Kept in
                           /etc/clearip-proxy/core for later runs (default: the kept value, else auto)
  --pure                   the same as --core pure
  --source DIR             the unpacked release (default: this script's parent directory)
  --release-id ID          recorded in /opt/clearip-proxy/release-id (the stack passes its asset hash)
  --wheels DIR             wheel directory with one folder per `uname -m` (default SOURCE/wheels)
  --offline                never use a package index: fail when the release has no wheels
  --service MODE           auto, systemctl or none: how to (re)start the proxy (default auto:
                           systemctl when systemd runs and --root is not given)
  --wait SECONDS           after a start, restart or reload, wait this long for the proxy to be
                           active and listening on 5060 (default 120; 0 = do not wait)
  --root DIR               install into DIR as a scratch root: no packages, users, systemctl or
                           firewall changes (for tests and image builds)
  --skip-venv              copy files and write settings but do not create the virtual environment
  --no-packages            do not install OS packages (python3.11, tcpdump, openssl)
  --firewall MODE          auto, firewalld, nftables or none (default auto)
  --uninstall              stop and remove the proxy, its unit, firewall rules and files
  --keep-config            with --uninstall: keep /etc/clearip-proxy (settings, TLS key)
  -h, --help               this text
USAGE
}

log() { printf 'install.sh: %s\n' "$*"; }
die() {
  printf 'install.sh: error: %s\n' "$*" >&2
  exit 2
}
changed() {
  CHANGES=$((CHANGES + 1))
  log "changed: $*"
}

# ---- arguments -------------------------------------------------------------------------------
need_arg() {
  if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value"; fi
}
while [ $# -gt 0 ]; do
  case "$1" in
    --allow)
      need_arg "$@"
      IFS=',' read -r -a _cidrs <<<"$2"
      for _c in "${_cidrs[@]}"; do
        _c="${_c// /}"
        [ -n "$_c" ] && ALLOW+=("$_c")
      done
      shift 2
      ;;
    --advertise) need_arg "$@"; ADVERTISE="$2"; shift 2 ;;
    --timeout) need_arg "$@"; TIMEOUT="$2"; shift 2 ;;
    --clearip-uri) need_arg "$@"; CLEARIP_URI="$2"; shift 2 ;;
    --clearip-transport) need_arg "$@"; TRANSPORT="$2"; shift 2 ;;
    --proxy-id) need_arg "$@"; PROXY_ID="$2"; shift 2 ;;
    --metrics) need_arg "$@"; METRICS="$2"; shift 2 ;;
    --aws-region) need_arg "$@"; REGION="$2"; shift 2 ;;
    --python) need_arg "$@"; PYTHON="$2"; shift 2 ;;
    --core) need_arg "$@"; CORE="$2"; shift 2 ;;
    --pure) CORE=pure; shift ;;
    --source) need_arg "$@"; SOURCE="$2"; shift 2 ;;
    --settings) need_arg "$@"; SITE="$2"; shift 2 ;;
    --release-id) need_arg "$@"; RELEASE_ID="$2"; shift 2 ;;
    --wheels) need_arg "$@"; WHEELS="$2"; shift 2 ;;
    --offline) OFFLINE=1; shift ;;
    --service) need_arg "$@"; SERVICE="$2"; shift 2 ;;
    --wait) need_arg "$@"; WAIT="$2"; shift 2 ;;
    --root) need_arg "$@"; ROOT="${2%/}"; shift 2 ;;
    --skip-venv) SKIP_VENV=1; shift ;;
    --no-packages) PACKAGES=0; shift ;;
    --firewall) need_arg "$@"; FIREWALL="$2"; shift 2 ;;
    --uninstall) UNINSTALL=1; shift ;;
    --keep-config) KEEP_CONFIG=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

if [ -n "$ROOT" ]; then
  mkdir -p "$ROOT"
  ROOT="$(cd "$ROOT" && pwd)"
  PACKAGES=0
fi
R="$ROOT"
# Touch the live system only without --root and when systemd runs.
LIVE=0
if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then LIVE=1; fi
case "$SERVICE" in
  auto) if [ "$LIVE" = 1 ]; then SERVICE=systemctl; else SERVICE=none; fi ;;
  systemctl | none) ;;
  *) die "--service $SERVICE: expected auto, systemctl or none" ;;
esac
[[ "$WAIT" =~ ^[0-9]+$ ]] || die "--wait $WAIT: a whole number of seconds"
# The core's build: the flag, else what an earlier run recorded, else auto.
CORE_FILE="$CONF_DIR/core"
[ -n "$CORE" ] || CORE=$(cat "$R$CORE_FILE" 2>/dev/null || true)
CORE="${CORE:-auto}"
case "$CORE" in
  auto | compiled | pure) ;;
  *) die "--core $CORE: expected auto, compiled or pure" ;;
esac
if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then die "run as root (or use --root DIR)"; fi

# ---- helpers ---------------------------------------------------------------------------------
imds() {
  local token
  token=$(curl -sf --max-time 3 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' \
    http://169.254.169.254/latest/api/token) || return 1
  curl -sf --max-time 3 -H "X-aws-ec2-metadata-token: $token" \
    "http://169.254.169.254/latest/meta-data/$1"
}

imds_retry() {
  local value='' i
  for i in $(seq 30); do
    if value=$(imds "$1") && [ -n "$value" ]; then
      printf '%s\n' "$value"
      return 0
    fi
    [ "$i" -lt 30 ] && sleep 2
  done
  return 1
}

# Write $2 to path $1 (relative to the root) with mode $3 when the content differs.
put_file() {
  local dest="$R$1" content="$2" mode="$3" tmp
  mkdir -p "$(dirname "$dest")"
  tmp=$(mktemp "$(dirname "$dest")/.install.XXXXXX")
  printf '%s' "$content" >"$tmp"
  chmod "$mode" "$tmp"
  if [ -f "$dest" ] && cmp -s "$tmp" "$dest" && [ "$(stat -c %a "$dest")" = "$mode" ]; then
    rm -f "$tmp"
    return 1
  fi
  mv -f "$tmp" "$dest"
  changed "$1"
  return 0
}

# Copy file $1 to path $2 (relative to the root) with mode $3 unless it is already there.
sync_file() {
  local src="$1" dest="$R$2" mode="$3"
  if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "$mode" ]; then
    return 0
  fi
  mkdir -p "$(dirname "$dest")"
  install -m "$mode" "$src" "$dest"
  changed "$2"
}

# The proxy's own settings code, from the release being installed (before its venv exists): the one
# place where a CIDR, the ClearIP URI's transport or a timeout is judged (proxy_runtime/settings).
proxy_cli() {
  PYTHONPATH="$SOURCE${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m proxy_runtime "$@"
}

# The `settings write` arguments for the flags given (only those: the site file and the host's
# current values fill the rest).
settings_args() {
  SETTINGS_ARGS=(--config "$CONF_DIR/settings.toml")
  [ -n "$ROOT" ] && SETTINGS_ARGS+=(--root "$ROOT")
  [ -n "$SITE" ] && SETTINGS_ARGS+=(--site "$SITE")
  local c
  for c in "${ALLOW[@]}"; do SETTINGS_ARGS+=(--allow "$c"); done
  [ -n "$ADVERTISE" ] && SETTINGS_ARGS+=(--set "advertise=$ADVERTISE")
  [ -n "$PROXY_ID" ] && SETTINGS_ARGS+=(--set "proxy_id=$PROXY_ID")
  [ -n "$TIMEOUT" ] && SETTINGS_ARGS+=(--set "timeout=$TIMEOUT")
  [ -n "$CLEARIP_URI" ] && SETTINGS_ARGS+=(--set "clearip=$CLEARIP_URI")
  [ -n "$METRICS" ] && SETTINGS_ARGS+=(--set "metrics=$METRICS")
  [ -n "$TRANSPORT" ] && SETTINGS_ARGS+=(--clearip-transport "$TRANSPORT")
  return 0
}

pick_python() {
  if [ -n "$PYTHON" ]; then
    command -v "$PYTHON" >/dev/null || die "--python $PYTHON: not found"
    return
  fi
  local c
  for c in python3.11 python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PYTHON="$c"
      return
    fi
  done
  die "no python >= 3.11: install python3.11 (dnf install python3.11 / apt-get install python3.11-venv)"
}

# True when a C compiler builds against $PYTHON's headers now (what setup.py's auto mode needs). Part
# of the release stamp in auto mode: a proxy that fell back to pure Python because the compiler or
# the headers were missing is rebuilt, compiled, by the first run that finds them working (and only
# then; a compile that fails for another reason does not rebuild on every run).
compiler_works() {
  local inc
  inc=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null) || return 1
  printf '#include <Python.h>\nint main(void) { return 0; }\n' \
    | "${CC:-gcc}" -I"$inc" -x c -c -o /dev/null - >/dev/null 2>&1
}

# True when python3.11's C headers (Python.h) are installed: the compiled core needs them.
has_python_headers() {
  local inc
  inc=$(python3.11 -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null) \
    && [ -f "$inc/Python.h" ]
}

# apt-get install "$@", the package lists refreshed first, once a run: a fresh cloud image or
# container has none (or week-old ones), and "Unable to locate package" would stop the install.
# dnf and yum refresh their metadata themselves.
APT_UPDATED=0
apt_install() {
  if [ "$APT_UPDATED" = 0 ]; then
    APT_UPDATED=1
    DEBIAN_FRONTEND=noninteractive apt-get update -q \
      || log "warning: apt-get update failed; installing from the package lists already there"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

install_packages() {
  local want=() tools=() pm=''
  command -v python3.11 >/dev/null || want+=(python3.11)
  command -v tcpdump >/dev/null || want+=(tcpdump)
  command -v openssl >/dev/null || want+=(openssl)
  if command -v apt-get >/dev/null; then
    pm=apt-get
    python3.11 -c 'import ensurepip' 2>/dev/null || want+=(python3.11-venv)
  elif command -v dnf >/dev/null || command -v yum >/dev/null; then
    pm="$(command -v dnf || command -v yum)"
  fi
  # What the compiled core needs, optional: a host without them runs the pure-Python core.
  if [ "$CORE" != pure ]; then
    command -v gcc >/dev/null || tools+=(gcc)
    if ! has_python_headers; then
      if [ "$pm" = apt-get ]; then tools+=(python3.11-dev); else tools+=(python3.11-devel); fi
    fi
  fi
  if [ -z "$pm" ]; then
    [ ${#want[@]} -eq 0 ] || log "warning: no dnf/yum/apt-get; install ${want[*]} yourself"
    [ ${#tools[@]} -eq 0 ] || log "warning: no dnf/yum/apt-get; without ${tools[*]} the core runs pure Python"
    return 0
  fi
  if [ ${#want[@]} -gt 0 ]; then
    log "installing ${want[*]}"
    if [ "$pm" = apt-get ]; then
      apt_install "${want[@]}"
    else
      "$pm" install -y -q "${want[@]}"
    fi
  fi
  if [ ${#tools[@]} -gt 0 ]; then
    log "installing ${tools[*]} (optional: to compile the proxy's core)"
    if [ "$pm" = apt-get ]; then
      apt_install "${tools[@]}" || tools=(failed "${tools[@]}")
    else
      "$pm" install -y -q "${tools[@]}" || tools=(failed "${tools[@]}")
    fi
    [ "${tools[0]}" != failed ] \
      || log "warning: could not install ${tools[*]:1}: the proxy's core will run pure Python"
  fi
  return 0
}

# Build the proxy's wheel from the release copy $1/src into $1/dist and set PROXY_WHEEL. The build
# venv ($1/venv, thrown away with $1) gets setuptools and mypy (mypyc) from the same place as the
# runtime's packages (PIP_FROM: the release's hash-pinned wheels, or the index), so the runtime venv
# never carries the compiler. setup.py with CLEARIP_COMPILE=auto compiles the core when gcc
# and the Python headers work and builds pure Python otherwise; the pip log is kept in
# $PREFIX/build.log (why a core is pure). A build venv that cannot be set up means a pure build too.
build_proxy_wheel() {
  local dir="$1" builder compile isolation=() why
  local pip=(-m pip --disable-pip-version-check)
  case "$CORE" in pure) compile=0 ;; compiled) compile=1 ;; *) compile=auto ;; esac
  builder="$VENV/bin/python"
  if [ "$compile" != 0 ]; then
    if [ ! -f "$dir/src/requirements-build.lock" ]; then
      why="the release has no requirements-build.lock"
    elif ! "$PYTHON" -m venv "$dir/venv" >"$dir/venv.log" 2>&1 \
      || ! "$dir/venv/bin/python" "${pip[@]}" install -q "${PIP_FROM[@]}" --require-hashes \
        -r "$dir/src/requirements-build.lock" >>"$dir/venv.log" 2>&1; then
      why="the build venv (setuptools, mypy) could not be installed: $(tail -n 1 "$dir/venv.log")"
    else
      why=''
      builder="$dir/venv/bin/python"
      isolation=(--no-build-isolation)
    fi
    if [ -n "$why" ]; then
      [ "$compile" = 1 ] && die "--core compiled: $why"
      log "warning: $why; building the pure-Python core"
      compile=0
    fi
  fi
  mkdir -p "$R$PREFIX"
  if ! CLEARIP_COMPILE="$compile" "$builder" "${pip[@]}" wheel -v --no-deps "${PIP_FROM[@]}" \
    "${isolation[@]}" -w "$dir/dist" "$dir/src" >"$R$PREFIX/build.log" 2>&1; then
    tail -n 20 "$R$PREFIX/build.log" >&2
    die "building the proxy's wheel failed (CLEARIP_COMPILE=$compile; log: $PREFIX/build.log)"
  fi
  # setup.py says on stderr why an auto build fell back to pure Python.
  local line
  while IFS= read -r line; do
    log "${line#"${line%%[! ]*}"}"
  done < <(grep -E '^ *clearip-proxy: building pure Python' "$R$PREFIX/build.log" | head -n 3 || true)
  PROXY_WHEEL=$(find "$dir/dist" -name 'clearip_proxy-*.whl' -print -quit)
  [ -n "$PROXY_WHEEL" ] || die "no clearip_proxy wheel in $dir/dist (log: $PREFIX/build.log)"
}

firewall_mode() {
  case "$FIREWALL" in
    none | firewalld | nftables) echo "$FIREWALL" ;;
    auto)
      if [ -z "$ROOT" ] && command -v firewall-cmd >/dev/null && firewall-cmd --state >/dev/null 2>&1; then
        echo firewalld
      elif [ -n "$ROOT" ] || command -v nft >/dev/null; then
        echo nftables
      else
        echo none
      fi
      ;;
    *) die "--firewall $FIREWALL: expected auto, firewalld, nftables or none" ;;
  esac
}

nft_rules() {
  local v4=() v6=() c joined
  for c in "${ALLOW[@]}"; do
    if [[ "$c" == *:* ]]; then v6+=("$c"); else v4+=("$c"); fi
  done
  printf '%s\n' "# Written by clearip-proxy install.sh: SIP (5060/udp, 5060/tcp, 5061/tcp) only from the" \
    "# trusted CIDRs. Loaded by clearip-proxy.service (ExecStartPre) and by install.sh." \
    "table inet clearip_proxy" "delete table inet clearip_proxy" "table inet clearip_proxy {"
  if [ ${#v4[@]} -gt 0 ]; then
    joined="${v4[*]}"
    printf '  set trusted4 {\n    type ipv4_addr\n    flags interval\n    elements = { %s }\n  }\n' \
      "${joined// /, }"
  fi
  if [ ${#v6[@]} -gt 0 ]; then
    joined="${v6[*]}"
    printf '  set trusted6 {\n    type ipv6_addr\n    flags interval\n    elements = { %s }\n  }\n' \
      "${joined// /, }"
  fi
  printf '%s\n' "  chain input {" "    type filter hook input priority filter - 1; policy accept;" \
    "    iif \"lo\" accept"
  if [ ${#v4[@]} -gt 0 ]; then
    printf '%s\n' "    ip saddr @trusted4 udp dport 5060 accept" "    ip saddr @trusted4 tcp dport { 5060, 5061 } accept"
  fi
  if [ ${#v6[@]} -gt 0 ]; then
    printf '%s\n' "    ip6 saddr @trusted6 udp dport 5060 accept" "    ip6 saddr @trusted6 tcp dport { 5060, 5061 } accept"
  fi
  printf '%s\n' "    udp dport 5060 drop" "    tcp dport { 5060, 5061 } drop" "  }" "}"
}

firewalld_apply() {
  local fw=(firewall-cmd --permanent --zone="$FW_ZONE") c p fw_changed=0 current
  if ! firewall-cmd --permanent --get-zones | tr ' ' '\n' | grep -qx "$FW_ZONE"; then
    firewall-cmd --permanent --new-zone="$FW_ZONE" >/dev/null
    fw_changed=1
  fi
  current=$("${fw[@]}" --list-sources | tr ' ' '\n')
  for c in "${ALLOW[@]}"; do
    grep -qx "$c" <<<"$current" || { "${fw[@]}" --add-source="$c" >/dev/null; fw_changed=1; }
  done
  for c in $current; do
    printf '%s\n' "${ALLOW[@]}" | grep -qx "$c" || { "${fw[@]}" --remove-source="$c" >/dev/null; fw_changed=1; }
  done
  current=$("${fw[@]}" --list-ports | tr ' ' '\n')
  for p in 5060/udp 5060/tcp 5061/tcp; do
    grep -qx "$p" <<<"$current" || { "${fw[@]}" --add-port="$p" >/dev/null; fw_changed=1; }
  done
  if [ "$fw_changed" = 1 ]; then
    firewall-cmd --reload >/dev/null
    changed "firewalld zone $FW_ZONE (sources: ${ALLOW[*]})"
  fi
}

# ---- uninstall -------------------------------------------------------------------------------
if [ "$UNINSTALL" = 1 ]; then
  if [ "$LIVE" = 1 ]; then
    systemctl disable --now "$UNIT" 2>/dev/null || true
    systemctl disable --now clearip-proxy-logs.service 2>/dev/null || true
  fi
  if [ -z "$ROOT" ]; then
    if command -v firewall-cmd >/dev/null && firewall-cmd --state >/dev/null 2>&1 \
      && firewall-cmd --permanent --get-zones | tr ' ' '\n' | grep -qx "$FW_ZONE"; then
      firewall-cmd --permanent --delete-zone="$FW_ZONE" >/dev/null && firewall-cmd --reload >/dev/null
    fi
    if command -v nft >/dev/null; then nft delete table inet clearip_proxy 2>/dev/null || true; fi
  fi
  remove=("$R$UNIT_DIR/$UNIT" "$R$UNIT_DIR/$UNIT.d" "$R$PREFIX" "$R/usr/local/bin/clearip-proxy"
    "$R$UNIT_DIR/clearip-proxy-logs.service" "$R/etc/logrotate.d/clearip-proxy"
    "$R/var/lib/clearip-proxy" "$R/etc/sysctl.d/90-clearip-proxy.conf")
  if [ "$KEEP_CONFIG" = 0 ]; then remove+=("$R$CONF_DIR"); fi
  rm -rf -- "${remove[@]}"
  if [ "$LIVE" = 1 ]; then systemctl daemon-reload; fi
  if [ -z "$ROOT" ] && getent passwd "$SERVICE_USER" >/dev/null; then userdel "$SERVICE_USER" || true; fi
  log "removed"
  exit 0
fi

# ---- validate --------------------------------------------------------------------------------
# OS packages first: the settings are judged by the proxy's own code, which needs python3.11.
[ "$PACKAGES" = 1 ] && install_packages
[ ${#ALLOW[@]} -gt 0 ] || [ -n "$SITE" ] || [ -f "$R$CONF_DIR/settings.toml" ] \
  || die "--allow CIDR is required: the switches and carriers that may send SIP"
[ -z "$SITE" ] || [ -f "$SITE" ] || die "--settings $SITE: no such file"
if [ ! -d "$SOURCE/proxy_runtime" ] || [ ! -f "$SOURCE/requirements-runtime.txt" ] \
  || [ ! -f "$SOURCE/deploy/$UNIT" ]; then
  die "--source $SOURCE: not a clearip-proxy release (proxy_runtime/, requirements-runtime.txt, deploy/)"
fi
SOURCE="$(cd "$SOURCE" && pwd)"
[ -n "$WHEELS" ] || WHEELS="$SOURCE/wheels"
if [ "$ADVERTISE" = imds ]; then
  ADVERTISE=$(imds_retry public-ipv4) || die "--advertise imds: no public IPv4 in the instance metadata"
fi
[[ "$ADVERTISE" =~ ^[A-Za-z0-9.:-]*$ ]] || die "--advertise $ADVERTISE: not an address or host name"
if [ "$PROXY_ID" = imds ]; then
  PROXY_ID=$(imds_retry instance-id) || die "--proxy-id imds: no instance id in the instance metadata"
fi
[[ "$PROXY_ID" =~ ^[A-Za-z0-9._-]*$ ]] || die "--proxy-id $PROXY_ID: letters, digits, '.', '_' and '-' only"
if [ "$REGION" = imds ]; then
  REGION=$(imds_retry placement/region) || die "--aws-region imds: no region in the instance metadata"
fi
[[ "$REGION" =~ ^[a-z0-9-]*$ ]] || die "--aws-region $REGION: not a region name"
[[ "$RELEASE_ID" =~ ^[A-Za-z0-9._-]*$ ]] || die "--release-id $RELEASE_ID: letters, digits, '.', '_' and '-' only"
pick_python
settings_args
# Every value checked now, before anything is changed (the TLS files may not exist yet).
proxy_cli settings write "${SETTINGS_ARGS[@]}" --dry-run --no-file-checks >/dev/null \
  || die "the settings above are refused; nothing was changed"

# ---- install ---------------------------------------------------------------------------------
if [ -z "$ROOT" ] && ! getent passwd "$SERVICE_USER" >/dev/null; then
  useradd --system --home-dir /var/lib/clearip-proxy --no-create-home \
    --shell "$(command -v nologin || echo /sbin/nologin)" "$SERVICE_USER"
  changed "user $SERVICE_USER"
fi

# The runtime: proxy_runtime/, pyproject.toml, requirements-runtime.txt, deploy/. Files that left
# the release are removed.
code_before=$CHANGES
declare -A WANT=()
RELEASE_FILES=("$SOURCE/proxy_runtime" "$SOURCE/deploy" "$SOURCE/pyproject.toml" "$SOURCE/requirements-runtime.txt")
for f in setup.py requirements-runtime.lock requirements-build.lock; do
  [ -f "$SOURCE/$f" ] && RELEASE_FILES+=("$SOURCE/$f")
done
while IFS= read -r -d '' f; do
  rel="${f#"$SOURCE"/}"
  WANT["$rel"]=1
  case "$rel" in *.sh) mode=755 ;; *) mode=644 ;; esac
  sync_file "$f" "$PREFIX/src/$rel" "$mode"
done < <(find "${RELEASE_FILES[@]}" -type f ! -name '*.pyc' ! -name '*.so' ! -path '*/__pycache__/*' -print0 | sort -z)
while IFS= read -r -d '' f; do
  rel="${f#"$R$PREFIX/src/"}"
  [ -n "${WANT[$rel]:-}" ] || { rm -f "$f"; changed "removed $PREFIX/src/$rel"; }
done < <(find "$R$PREFIX/src" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0)
# The core's build mode, kept for later runs; a changed mode rebuilds and restarts like a release.
put_file "$CORE_FILE" "$CORE
" 644 || true

if [ "$SKIP_VENV" = 0 ]; then
  VENV="$R$PREFIX/venv"
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $PREFIX/venv with $PYTHON"
    "$PYTHON" -m venv "$VENV"
    changed "$PREFIX/venv"
  fi
  # Reinstall only when the release or the core's build mode changed: the stamp is a hash of every
  # runtime file and the mode (in auto mode, with whether a compiler works: see compiler_works).
  core_stamp="core=$CORE"
  if [ "$CORE" = auto ]; then
    if compiler_works; then core_stamp+=" compiler=yes"; else core_stamp+=" compiler=no"; fi
  fi
  stamp=$( (cd "$R$PREFIX/src" && find . -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 \
    | sort -z | xargs -0 sha256sum; echo "$core_stamp") | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$VENV/.release-sha256" 2>/dev/null || true)" != "$stamp" ]; then
    build=$(mktemp -d "$R$PREFIX/.build.XXXXXX")  # not /tmp: often noexec, and mypy must load there
    trap 'rm -rf "$build"' EXIT  # also when the build fails
    mkdir "$build/src"
    cp -r "$R$PREFIX/src/." "$build/src/"
    arch_wheels="$WHEELS/$(uname -m)"
    if [ -f "$build/src/requirements-runtime.lock" ] && [ -d "$arch_wheels" ]; then
      # The release's own wheels, each checked against its pinned hash; no package index at all.
      log "installing the runtime dependencies from $arch_wheels (hash-pinned, no index) and the proxy"
      PIP_FROM=(--no-index --find-links "$arch_wheels")
      "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PIP_FROM[@]}" \
        --require-hashes -r "$build/src/requirements-runtime.lock"
    elif [ "$OFFLINE" = 1 ]; then
      die "--offline: the release has no wheels for $(uname -m) in $WHEELS (build the asset with make wheels)"
    else
      log "no wheels in the release: installing requirements-runtime.txt from the package index"
      PIP_FROM=()
      "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
        -r "$build/src/requirements-runtime.txt"
    fi
    started=$SECONDS
    build_proxy_wheel "$build"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-index --no-deps \
      --force-reinstall "$PROXY_WHEEL"
    rm -rf "$build"
    trap - EXIT
    log "installed $("$VENV/bin/clearip-proxy" --version) (--core $CORE; built in $((SECONDS - started)) s)"
    printf '%s\n' "$stamp" >"$VENV/.release-sha256"
    changed "$PREFIX/venv packages"
  fi
  if [ "$(readlink "$R/usr/local/bin/clearip-proxy" 2>/dev/null || true)" != "$PREFIX/venv/bin/clearip-proxy" ]; then
    mkdir -p "$R/usr/local/bin"
    ln -sfn "$PREFIX/venv/bin/clearip-proxy" "$R/usr/local/bin/clearip-proxy"
    changed "/usr/local/bin/clearip-proxy"
  fi
fi
if [ -n "$RELEASE_ID" ]; then
  put_file "$PREFIX/release-id" "$RELEASE_ID
" 644 || true
fi
CODE_CHANGED=0
[ "$CHANGES" -gt "$code_before" ] && CODE_CHANGED=1

# TLS for the 5061 listener: self-signed unless the operator put a certificate there.
TLS_DIR="$CONF_DIR/tls"
if [ ! -s "$R$TLS_DIR/cert.pem" ] || [ ! -s "$R$TLS_DIR/key.pem" ]; then
  mkdir -p "$R$TLS_DIR"
  chmod 750 "$R$TLS_DIR"
  cn="${ADVERTISE:-$(hostname)}"
  if [[ "$cn" =~ ^[0-9.]+$ ]] || [[ "$cn" == *:* ]]; then san="IP:$cn"; else san="DNS:$cn"; fi
  ( umask 077
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
      -subj "/CN=$cn" -addext "subjectAltName=$san" \
      -keyout "$R$TLS_DIR/key.pem" -out "$R$TLS_DIR/cert.pem" 2>/dev/null )
  chmod 644 "$R$TLS_DIR/cert.pem"
  chmod 640 "$R$TLS_DIR/key.pem"
  changed "$TLS_DIR (self-signed certificate for $cn; replace it with your own)"
fi

# The settings file, whole: host fields kept, the site file, then the flags; the proxy's own code
# validates it and says how the running proxy takes the change (unchanged, reload or restart).
SETTINGS_ARGS+=(--set "tls_cert=$TLS_DIR/cert.pem" --set "tls_key=$TLS_DIR/key.pem")
APPLY=$(proxy_cli settings write "${SETTINGS_ARGS[@]}") || die "writing $CONF_DIR/settings.toml failed"
APPLY="${APPLY##*$'\n'}"
case "$APPLY" in
  unchanged) ;;
  reload | restart) changed "$CONF_DIR/settings.toml (applied by $APPLY)" ;;
  *) die "settings write said '$APPLY'" ;;
esac
# The firewall admits what the settings file allows (read back by the same code).
mapfile -t ALLOW < <(proxy_cli settings get allow --config "$CONF_DIR/settings.toml" ${ROOT:+--root "$ROOT"})
[ ${#ALLOW[@]} -gt 0 ] || die "$CONF_DIR/settings.toml allows no source"
if [ -n "$REGION" ]; then
  put_file "$CONF_DIR/environment" "AWS_REGION=$REGION
AWS_DEFAULT_REGION=$REGION
" 644 || true
fi

# Large UDP socket buffers (the proxy asks for 8 MiB; the kernel caps it at rmem_max/wmem_max): a
# 200 KB default overflows in a few milliseconds at hundreds of calls per second.
if put_file "/etc/sysctl.d/90-clearip-proxy.conf" "# Written by install.sh (clearip-proxy): room for SIP over UDP under load.
net.core.rmem_max = 8388608
net.core.wmem_max = 8388608
" 644; then
  if [ "$LIVE" = 1 ] && command -v sysctl >/dev/null; then
    sysctl -q -p "/etc/sysctl.d/90-clearip-proxy.conf" || log "could not apply the UDP buffer sysctls now"
  fi
fi

UNIT_CHANGED=0
before=$CHANGES
sync_file "$SOURCE/deploy/$UNIT" "$UNIT_DIR/$UNIT" 644

MODE=$(firewall_mode)
case "$MODE" in
  nftables)
    NFT_CHANGED=0
    # The rules change with the allow-list; nft loads them now, the proxy needs no restart for it.
    fw_before=$CHANGES
    if put_file "$CONF_DIR/firewall.nft" "$(nft_rules)
" 644; then NFT_CHANGED=1; fi
    before=$((before + CHANGES - fw_before))
    put_file "$UNIT_DIR/$UNIT.d/firewall.conf" "# Written by install.sh: load the SIP allow-list before the proxy starts.
[Service]
ExecStartPre=+$(command -v nft || echo /usr/sbin/nft) -f $CONF_DIR/firewall.nft
" 644 || true
    if [ -z "$ROOT" ] && [ "$NFT_CHANGED" = 1 ]; then nft -f "$CONF_DIR/firewall.nft"; fi
    ;;
  firewalld)
    rm -f "$R$UNIT_DIR/$UNIT.d/firewall.conf" "$R$CONF_DIR/firewall.nft"
    fw_before=$CHANGES
    firewalld_apply
    before=$((before + CHANGES - fw_before))
    ;;
  none) log "no firewall changes (--firewall none, or neither firewalld nor nft found)" ;;
esac
# A changed unit or drop-in needs daemon-reload and a restart; firewall rules alone do not.
[ "$CHANGES" -gt "$before" ] && UNIT_CHANGED=1 && CODE_CHANGED=1

if [ -z "$ROOT" ] && getent group "$SERVICE_USER" >/dev/null; then
  chown root:"$SERVICE_USER" "$CONF_DIR" "$CONF_DIR/settings.toml" "$TLS_DIR" "$TLS_DIR/key.pem"
  chmod 750 "$CONF_DIR"
fi

# Bring the running proxy to what is installed: a new release, unit or restart-only setting needs a
# restart (systemd sends SIGTERM: the proxy answers new INVITEs 503 so switches route-advance, and
# drains calls in flight for up to drain_timeout); reloadable settings are applied by SIGHUP without
# dropping a call. Then wait until it is active and listening, or fail (the deploy stops here).
ACTION=''
if [ "$SERVICE" = systemctl ]; then
  [ "$UNIT_CHANGED" = 1 ] && systemctl daemon-reload
  systemctl is-enabled --quiet "$UNIT" 2>/dev/null || { systemctl enable --quiet "$UNIT"; changed "enabled $UNIT"; }
  if ! systemctl is-active --quiet "$UNIT"; then
    systemctl start "$UNIT"
    ACTION=started
  elif [ "$CODE_CHANGED" = 1 ] || [ "$APPLY" = restart ]; then
    log "restarting $UNIT (SIGTERM: calls in flight drain first)"
    systemctl restart "$UNIT"
    ACTION=restarted
  elif [ "$APPLY" = reload ]; then
    systemctl reload "$UNIT"
    ACTION=reloaded
  fi
  if [ -n "$ACTION" ]; then
    log "$ACTION $UNIT"
    if [ "$WAIT" -gt 0 ]; then
      ready=0
      for _ in $(seq "$WAIT"); do
        if systemctl is-active --quiet "$UNIT" \
          && ss -Hlun 'sport = :5060' | grep -q . && ss -Hltn 'sport = :5060' | grep -q .; then
          ready=1
          break
        fi
        sleep 1
      done
      if [ "$ready" = 0 ]; then
        journalctl -u "$UNIT" --no-pager -n 50 || true
        die "$UNIT is not active and listening on 5060 ${WAIT}s after it was $ACTION (journalctl -u $UNIT)"
      fi
      log "$UNIT is active and listening on 5060"
    fi
  fi
elif [ -z "$ROOT" ]; then
  log "no systemd running: start it with $PREFIX/venv/bin/clearip-proxy run --config $CONF_DIR/settings.toml"
fi

# ---- BEGIN operator-view: per-call log export (docs/METRICS.md "Per-call lines in CloudWatch") ----
# The proxy's journal is split into /var/log/clearip-proxy/{calls,proxy}.log for the CloudWatch
# agent (the stack installs and configures the agent itself, through SSM). After the proxy's own
# start above, so a change here never restarts the proxy.
LOGS_UNIT=clearip-proxy-logs.service
before=$CHANGES
sync_file "$SOURCE/deploy/$LOGS_UNIT" "$UNIT_DIR/$LOGS_UNIT" 644
sync_file "$SOURCE/deploy/clearip-proxy.logrotate" /etc/logrotate.d/clearip-proxy 644
if [ "$PACKAGES" = 1 ] && command -v dnf >/dev/null && ! command -v logrotate >/dev/null; then
  dnf install -y -q logrotate || log "could not install logrotate: rotate /var/log/clearip-proxy yourself"
fi
if [ "$LIVE" = 1 ]; then
  [ "$CHANGES" -gt "$before" ] && systemctl daemon-reload
  if [ "$CHANGES" -gt "$before" ] || ! systemctl is-active --quiet "$LOGS_UNIT"; then
    systemctl enable --quiet "$LOGS_UNIT"
    systemctl restart "$LOGS_UNIT"
  fi
fi
# ---- END operator-view -------------------------------------------------------------------------

if [ "$CHANGES" -eq 0 ]; then
  log "unchanged"
else
  log "done: $CHANGES change(s)${ROOT:+ under $ROOT}"
fi
