#!/usr/bin/env bash
# Boot a real systemd as PID 1 of a throwaway PID + mount namespace, on an overlay of / (the
# recipe of shared/systemd-facts.md). Used by tests/systemd_harness.py; not for people.
#
#   systemd_ns.sh outer CGROUPS WORK [SRC:DEST...]
#       (host side) enter the private cgroups CGROUPS (directories, colon-separated, already
#       made: in the name=systemd and unified hierarchies, or in cgroup v2), then become
#       `unshare` of new PID, mount, UTS, IPC and network namespaces whose first process runs
#       `inner`. Dies with its parent (the test), and PID 1 of the namespace with it.
#   systemd_ns.sh inner WORK [SRC:DEST...]
#       (PID 1 of the namespace) build the root: an overlay of / whose writes go to a tmpfs on
#       WORK, its own /proc, a read-only /sys (cgroups writable), a small /dev, tmpfs on /run
#       and /tmp, SRC bound read-only on DEST (under /mnt); then pivot into it and exec systemd
#       on a minimal target of its own.
#
# Never boots systemd on the machine's own root: systemd-tmpfiles would empty the host's /tmp
# and the default target would start the host's services. `inner` checks that it is PID 1 and
# that the root it pivoted into is the overlay before it execs systemd, and refuses otherwise.
set -euo pipefail

die() {
    echo "systemd_ns.sh: $*" >&2
    exit 1
}

outer() {
    local cgroups=$1 work=$2
    shift 2
    local cg
    IFS=: read -ra cgroups <<<"$cgroups"
    for cg in "${cgroups[@]}"; do
        echo $$ >"$cg/cgroup.procs" || die "cannot enter the cgroup $cg"
    done
    exec setpriv --pdeathsig KILL -- unshare --kill-child=SIGKILL --fork --pid --mount --uts \
        --ipc --net --propagation private "$0" inner "$work" "$@"
}

inner() {
    local work=$1
    shift
    [[ $$ == 1 ]] || die "inner must be PID 1 of a new PID namespace (is $$)"
    mkdir -p "$work"
    mount -t tmpfs -o mode=0700 qmpwatch-test "$work"
    local R=$work/root U=$work/upper W=$work/work
    mkdir -p "$R" "$U" "$W"
    mount -t overlay -o "lowerdir=/,upperdir=$U,workdir=$W" qmpwatch-test-root "$R"

    mount -t proc proc "$R/proc"
    mount --bind "$R/proc/sys" "$R/proc/sys"
    mount -o remount,bind,ro "$R/proc/sys"
    mount --rbind /sys "$R/sys"
    mount -o remount,bind,ro "$R/sys"
    # A /sys/fs/cgroup of its own, holding the host's hierarchies: systemd mounts the v1
    # hierarchies it misses there and remounts that tmpfs read-only, which done to the host's
    # (a bind of the same superblock) would make the host's /sys/fs/cgroup read-only.
    if [[ "$(stat -f -c %T /sys/fs/cgroup)" == tmpfs ]]; then
        mount -t tmpfs -o mode=0755,nosuid,nodev,noexec qmpwatch-test-cgroup "$R/sys/fs/cgroup"
        local h
        for h in /sys/fs/cgroup/*; do
            mountpoint -q "$h" || continue
            mkdir "$R$h"
            mount --bind "$h" "$R$h"
        done
    fi

    mount -t tmpfs -o mode=0755,nosuid qmpwatch-test-dev "$R/dev"
    local d
    for d in null zero full random urandom tty kvm; do
        [[ -e /dev/$d ]] || continue
        touch "$R/dev/$d"
        mount --bind "/dev/$d" "$R/dev/$d"
    done
    mkdir -p "$R/dev/pts" "$R/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$R/dev/pts"
    ln -s pts/ptmx "$R/dev/ptmx"
    mount -t tmpfs -o mode=1777,nosuid,nodev shm "$R/dev/shm"
    ln -s /proc/self/fd "$R/dev/fd"
    ln -s /proc/self/fd/0 "$R/dev/stdin"
    ln -s /proc/self/fd/1 "$R/dev/stdout"
    ln -s /proc/self/fd/2 "$R/dev/stderr"
    touch "$work/console.log" "$R/dev/console"
    mount --bind "$work/console.log" "$R/dev/console"

    mount -t tmpfs -o mode=0755,nosuid,nodev run "$R/run"
    mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$R/tmp"
    local bind src dest
    for bind in "$@"; do
        src=${bind%%:*}
        dest=${bind#*:}
        [[ $dest == /mnt/* ]] || die "bind destinations go under /mnt: $dest"
        mkdir -p "$R$dest"
        mount --bind "$src" "$R$dest"
        mount -o remount,bind,ro "$R$dest"
    done

    mkdir -p "$R/run/systemd/system"
    cat >"$R/run/systemd/system/qmpwatch-test.target" <<'EOF'
[Unit]
Description=qmpwatch test system: sysinit and sockets, nothing of the host's
Requires=sysinit.target sockets.target
After=sysinit.target sockets.target
AllowIsolate=yes
EOF
    # systemd's idea of the machine: a container of its own, with an ID of its own.
    echo qmpwatch-test >"$R/etc/hostname"
    rm -f "$R/etc/machine-id"
    : >"$R/etc/machine-id"

    cd "$R"
    mkdir -p .oldroot
    pivot_root . .oldroot
    cd /
    umount -l /.oldroot
    rmdir /.oldroot

    [[ "$(stat -f -c %T /)" == overlayfs ]] || die "refusing to boot systemd: / is not the overlay"
    exec setpriv --bounding-set -sys_module,-sys_time,-sys_rawio,-wake_alarm \
        env -i container=other PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        /lib/systemd/systemd --unit=qmpwatch-test.target --show-status=no
}

case "${1:-}" in
outer) shift && outer "$@" ;;
inner) shift && inner "$@" ;;
*) die "usage: $0 outer CGROUPS WORK [SRC:DEST...] | inner WORK [SRC:DEST...]" ;;
esac
