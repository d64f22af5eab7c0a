#!/usr/bin/env bash
# smolcluster namespace lab: the six hosts of the cluster as Linux network namespaces.
#
#   tests/lab/lab.sh up [--netem]   build namespaces, links, Wi-Fi addresses and one sshd per host
#   tests/lab/lab.sh down           kill every process in the lab namespaces, delete them, keep keys
#   tests/lab/lab.sh status         list namespaces, addresses, routes and sshd pids
#
# Only the Wi-Fi segment (lab-only 172.27.83.0/24) is addressed here; the fabric (10.10.0.0/24) and
# the edge links (192.168.50/51.0/24) stay bare so the network role has real work to do.
# Nothing in the root namespace gets an address or a route: SSH goes in through
# `ip netns exec scl-<host> socat STDIO TCP:127.0.0.1:22` (see inventory/lab.yml).
set -euo pipefail

LAB_PREFIX="scl-"
HOSTS=(mini1 mini2 mini3 pi4 pi5 macbook)
FABRIC_HOSTS=(mini1 mini2 mini3)
WIFI_NET="172.27.83"
WIFI_ROUTER="${WIFI_NET}.1"
declare -A WIFI_ADDR=(
  [mini1]="${WIFI_NET}.11" [mini2]="${WIFI_NET}.12" [mini3]="${WIFI_NET}.13"
  [pi4]="${WIFI_NET}.14" [pi5]="${WIFI_NET}.15" [macbook]="${WIFI_NET}.16"
)
# Point-to-point edge cables: "<mac> <mac device> <pi> <pi device>".
EDGE_LINKS=("mini1 edge50 pi5 eth0" "mini3 edge51 pi4 eth0")
# Prefixes that must never appear in the root namespace (NETWORK RULE).
LAB_PREFIXES_RE='(^| )(10\.10\.0\.|192\.168\.50\.|192\.168\.51\.|172\.27\.83\.)'

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
LAB_DIR="${SMOLCLUSTER_LAB_DIR:-${REPO}/.lab}"
SSH_DIR="${LAB_DIR}/ssh"

ns() { echo "${LAB_PREFIX}$1"; }
nsexec() { local n="$1"; shift; ip netns exec "$(ns "$n")" "$@"; }
log() { echo "lab: $*" >&2; }
die() { echo "lab: error: $*" >&2; exit 1; }

require_tools() {
  [[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces)"
  local tool
  for tool in ip sshd ssh-keygen socat ping tmux; do
    command -v "$tool" >/dev/null 2>&1 || [[ -x /usr/sbin/$tool ]] || die "missing tool: $tool"
  done
  ip netns list >/dev/null 2>&1 || die "ip netns is not usable here"
}

lab_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep "^${LAB_PREFIX}" || true; }

refuse_if_root_has_lab_addresses() {
  # Any lab prefix on a root-namespace address or route means the lab would mix with real traffic.
  if ip -4 -o addr show | awk '{print " "$4}' | grep -Eq "$LAB_PREFIXES_RE"; then
    die "a lab address exists in the root namespace; refusing to start"
  fi
  if ip -4 route show table all | awk '{print " "$1" "$3}' | grep -Eq "$LAB_PREFIXES_RE"; then
    die "a route to a lab prefix exists in the root namespace; refusing to start"
  fi
}

make_keys() {
  mkdir -p "$SSH_DIR"
  chmod 700 "$LAB_DIR" "$SSH_DIR"
  [[ -f "$SSH_DIR/id_ed25519" ]] ||
    ssh-keygen -q -t ed25519 -N '' -C "smolcluster-lab" -f "$SSH_DIR/id_ed25519"
  cp "$SSH_DIR/id_ed25519.pub" "$SSH_DIR/authorized_keys"
  chmod 600 "$SSH_DIR/authorized_keys"
  : >"$SSH_DIR/known_hosts"
}

host_dirs() {
  local h="$1" d="${LAB_DIR}/hosts/$1"
  mkdir -p "$d/ssh" "$d/tmp" "$d/tmux" "$d/home"
  [[ -f "$d/ssh/ssh_host_ed25519_key" ]] ||
    ssh-keygen -q -t ed25519 -N '' -C "$h" -f "$d/ssh/ssh_host_ed25519_key"
  cat >"$d/ssh/sshd_config" <<EOF
# sshd for lab host $h; lives only inside namespace $(ns "$h").
ListenAddress 127.0.0.1:22
ListenAddress ${WIFI_ADDR[$h]}:22
HostKey $d/ssh/ssh_host_ed25519_key
PidFile $d/ssh/sshd.pid
AuthorizedKeysFile $SSH_DIR/authorized_keys
# The checkout may live under a world-writable directory (CI clones into /tmp); sshd's
# StrictModes would then refuse the lab's keys. The keys are made per lab, for the lab.
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
X11Forwarding no
PrintMotd no
MaxSessions 30
MaxStartups 30:30:60
# Every lab host exports where its own files live, so jobs never share a tmux socket or directory.
SetEnv SMOLCLUSTER_LAB_HOST=$h SMOLCLUSTER_HOST_DIR=$d TMUX_TMPDIR=$d/tmux
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
  echo "${WIFI_ADDR[$h]} $(cut -d' ' -f1,2 "$d/ssh/ssh_host_ed25519_key.pub")" >>"$SSH_DIR/known_hosts"
}

veth() {
  # veth <ns a> <dev a> <ns b> <dev b>: a cable between two namespaces.
  ip link add "$2" netns "$1" type veth peer name "$4" netns "$3"
  ip -n "$1" link set "$2" up
  ip -n "$3" link set "$4" up
}

bridge_ns() {
  # A namespace holding one bridge br0: the shared segment (switch) of a link.
  local n="$1"
  ip netns add "$n"
  ip -n "$n" link set lo up
  ip -n "$n" link add br0 type bridge
  ip -n "$n" link set br0 up
}

apply_netem() {
  # Rough link profiles: Thunderbolt (fast, tiny delay), GbE edge, Wi-Fi (slow, jittery).
  local h
  tc -n "$(ns wifi)" qdisc replace dev br0 root netem delay 0ms 2>/dev/null ||
    die "tc netem is not available here (kernel module sch_netem); run up without --netem"
  tc -n "$(ns wifi)" qdisc del dev br0 root
  for h in "${FABRIC_HOSTS[@]}"; do
    tc -n "$(ns "$h")" qdisc replace dev tb0 root netem delay 50us rate 20gbit
  done
  local spec mac mdev pi pdev
  for spec in "${EDGE_LINKS[@]}"; do
    read -r mac mdev pi pdev <<<"$spec"
    tc -n "$(ns "$mac")" qdisc replace dev "$mdev" root netem delay 200us rate 940mbit
    tc -n "$(ns "$pi")" qdisc replace dev "$pdev" root netem delay 200us rate 940mbit
  done
  for h in "${HOSTS[@]}"; do
    tc -n "$(ns "$h")" qdisc replace dev wlan0 root netem delay 3ms 1ms rate 200mbit
  done
}

start_sshd() {
  local h="$1" d="${LAB_DIR}/hosts/$1"
  mkdir -p /run/sshd # privilege separation directory openssh expects (exists when sshd is installed)
  nsexec "$h" /usr/sbin/sshd -f "$d/ssh/sshd_config" -E "$d/ssh/sshd.log"
}

wait_sshd() {
  local h="$1" i
  for i in $(seq 1 50); do
    if nsexec "$h" socat -u OPEN:/dev/null TCP:127.0.0.1:22,connect-timeout=1 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  die "sshd in $(ns "$h") did not come up (see ${LAB_DIR}/hosts/$h/ssh/sshd.log)"
}

cmd_up() {
  local netem=0
  [[ "${1:-}" == "--netem" ]] && netem=1
  require_tools
  [[ -z "$(lab_namespaces)" ]] || die "lab namespaces already exist ($(lab_namespaces | xargs)); run: $0 down"
  refuse_if_root_has_lab_addresses
  # From here on any failure tears down whatever was built.
  trap 'log "setup failed; tearing down"; cmd_down >/dev/null 2>&1 || true' EXIT
  trap 'exit 130' INT TERM
  make_keys
  local h
  for h in "${HOSTS[@]}"; do
    ip netns add "$(ns "$h")"
    ip -n "$(ns "$h")" link set lo up
    host_dirs "$h"
  done
  bridge_ns "$(ns tb)"
  bridge_ns "$(ns wifi)"
  # Wi-Fi: every host on one segment; the access point's address is their default gateway
  # (it does not forward, so Wi-Fi never becomes a path between cluster links).
  ip -n "$(ns wifi)" addr add "${WIFI_ROUTER}/24" dev br0
  for h in "${HOSTS[@]}"; do
    veth "$(ns "$h")" wlan0 "$(ns wifi)" "$h"
    ip -n "$(ns wifi)" link set "$h" master br0
    ip -n "$(ns "$h")" addr add "${WIFI_ADDR[$h]}/24" dev wlan0
    ip -n "$(ns "$h")" route add default via "$WIFI_ROUTER" dev wlan0
  done
  # Thunderbolt fabric: mini1-3 on one bridge; addresses come from the network role.
  for h in "${FABRIC_HOSTS[@]}"; do
    veth "$(ns "$h")" tb0 "$(ns tb)" "$h"
    ip -n "$(ns tb)" link set "$h" master br0
  done
  local spec mac mdev pi pdev
  for spec in "${EDGE_LINKS[@]}"; do
    read -r mac mdev pi pdev <<<"$spec"
    veth "$(ns "$mac")" "$mdev" "$(ns "$pi")" "$pdev"
  done
  [[ $netem -eq 1 ]] && apply_netem
  for h in "${HOSTS[@]}"; do start_sshd "$h"; done
  for h in "${HOSTS[@]}"; do wait_sshd "$h"; done
  refuse_if_root_has_lab_addresses
  trap - EXIT INT TERM
  log "up: ${HOSTS[*]} (ssh via inventory/lab.yml, keys in ${SSH_DIR})"
}

cmd_down() {
  require_tools
  local n pids
  # Processes we started in the lab (sshd, ansible, tmux, trainers) all live in its namespaces.
  for n in $(lab_namespaces); do
    pids="$(ip netns pids "$n" 2>/dev/null || true)"
    [[ -n "$pids" ]] && kill $pids 2>/dev/null || true
  done
  sleep 0.3
  for n in $(lab_namespaces); do
    pids="$(ip netns pids "$n" 2>/dev/null || true)"
    [[ -n "$pids" ]] && kill -9 $pids 2>/dev/null || true
  done
  for n in $(lab_namespaces); do
    ip netns del "$n" || log "could not delete $n"
  done
  rm -f "${LAB_DIR}"/hosts/*/ssh/sshd.pid
  [[ -z "$(lab_namespaces)" ]] || die "namespaces left: $(lab_namespaces | xargs)"
  log "down: no lab namespace left"
}

cmd_status() {
  local n
  if [[ -z "$(lab_namespaces)" ]]; then echo "lab: down"; return 0; fi
  for n in $(lab_namespaces); do
    echo "== $n (pids: $(ip netns pids "$n" | xargs))"
    ip -n "$n" -4 -br addr show | grep -v '^lo ' || true
    ip -n "$n" -4 route show | sed 's/^/   route: /'
  done
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up [--netem] | down | status" >&2; exit 2 ;;
esac
