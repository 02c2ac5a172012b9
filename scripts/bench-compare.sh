#!/usr/bin/env bash
# postling against Postfix 3.7 on this machine, loopback only:
#
#   1. inbound SMTP into a Maildir with fsync, end to end (sessions x sizes),
#   2. CPU per message of the whole server (a cgroup around each server),
#   3. relay throughput to Postfix's smtp-sink (no disk),
#   4. memory: idle, and with 100 sessions parked in DATA,
#   5. the disk's own Maildir fsync ceiling (1 and 8 threads),
#   6. a floor under CPU per message on this machine: Postfix's smtp-sink
#      (SMTP only, no disk) under the same load, plus the kernel CPU of
#      writing one Maildir file the durable way.
#
# Each server is started fresh for each run, runs alternate A B A B
# (postling, Postfix, postling, Postfix), and the table reports the median
# per server. Every run is bounded in count and time; every process started
# here is stopped by its PID; the temp dir is removed on exit.
#
#   scripts/bench-compare.sh [--quick]
#
# --quick: small counts and one repetition (about 3 minutes); it prints the
# table but leaves BENCHMARKS.md alone unless BENCH_WRITE=1. A full run
# (under 30 minutes) also replaces the section between the
# `<!-- bench-compare:begin -->` and `<!-- bench-compare:end -->` markers in
# BENCHMARKS.md (appends it if missing), unless BENCH_WRITE=0.
#
# Environment (defaults for a full run; --quick in brackets):
#   BENCH_REPS=2 [1]        runs per server and configuration
#   BENCH_SESSIONS="1 10 50" concurrent smtp-source sessions (-s)
#   BENCH_M_4K=5000 [300]   messages of 4 KiB per inbound run
#   BENCH_M_100K=1000 [100] messages of 100 KiB per inbound run
#   BENCH_RELAY_M=5000 [300] messages per relay run (10 sessions, 4 KiB)
#   BENCH_HOLD=100          sessions held open in DATA for the memory test
#   BENCH_FSYNC_N=2000 [300] files per fsync-ceiling run
#   BENCH_TIMEOUT=600 [180] seconds allowed for each run
#   BENCH_CPUS=             a CPU list for taskset (e.g. 0): every server,
#                           smtp-source and probe runs on those CPUs only; a
#                           pinned run writes its own section of BENCHMARKS.md
#   BENCH_TMPDIR=$TMPDIR or /tmp   where the temp dir goes (it must be on the
#                           disk you want to measure, not a tmpfs)
#   BENCH_SETTLE=180        seconds to wait after an earlier run's cleanup
#                           (its deletions slow file creation for minutes)
#
# Needs root (a private Postfix instance, cgroups), python3, cargo, and
# Debian's postfix package (installed here with apt-get if smtp-source is
# missing; the system Postfix instance is then stopped again).
set -Eeuo pipefail

usage() { sed -n '2,/^set -E/p' "$0" | sed -e '/^set -E/d' -e 's/^# \{0,1\}//'; }
quick=0
case ${1:-} in
  --quick) quick=1 ;;
  "") ;;
  -h | --help) usage; exit 0 ;;
  *) usage >&2; exit 64 ;;
esac
[ $# -le 1 ] || { usage >&2; exit 64; }

if [ "$quick" = 1 ]; then
  reps=${BENCH_REPS:-1} m4k=${BENCH_M_4K:-300} m100k=${BENCH_M_100K:-100}
  relay_m=${BENCH_RELAY_M:-300} fsync_n=${BENCH_FSYNC_N:-300} run_timeout=${BENCH_TIMEOUT:-180}
  write=${BENCH_WRITE:-0}
else
  reps=${BENCH_REPS:-2} m4k=${BENCH_M_4K:-5000} m100k=${BENCH_M_100K:-1000}
  relay_m=${BENCH_RELAY_M:-5000} fsync_n=${BENCH_FSYNC_N:-2000} run_timeout=${BENCH_TIMEOUT:-600}
  write=${BENCH_WRITE:-1}
fi
read -r -a sessions <<<"${BENCH_SESSIONS:-1 10 50}"
hold=${BENCH_HOLD:-100}
relay_s=10

[ "$(id -u)" = 0 ] || { echo "bench-compare: run as root (private Postfix instance, cgroups)" >&2; exit 1; }
# Pinned: this shell's affinity is inherited by everything it starts.
cpus=${BENCH_CPUS:-}
if [ -n "$cpus" ]; then taskset -pc "$cpus" $$ >/dev/null; fi
cd "$(dirname "$0")/.."
repo=$PWD
PATH=$PATH:/usr/sbin:/usr/lib/postfix/sbin

# --- Postfix, from Debian's package --------------------------------------
if ! command -v smtp-source >/dev/null; then
  echo "== installing postfix (smtp-source, smtp-sink)" >&2
  # "Local only" makes the system instance's main.cf listen on loopback only.
  printf '%s\n' "postfix postfix/main_mailer_type select Local only" \
    "postfix postfix/mailname string localhost" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y postfix >&2 ||
    { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y postfix >&2; }
  # The package may have started the system instance: stop it again.
  if postfix status 2>/dev/null; then postfix stop >&2 || true; fi
fi
pf_version=$(postconf -h mail_version)
if postfix status 2>/dev/null; then
  echo "bench-compare: note: the system Postfix instance is running (not started by this script); left alone" >&2
fi

echo "== building postling (cargo build --release)" >&2
cargo build --release --quiet
bin=$repo/target/release/postling
bin_size=$(stat -c %s "$bin")

base=${BENCH_TMPDIR:-${TMPDIR:-/tmp}}
# A run's cleanup deletes tens of thousands of files, and on this VM's ext4
# (no journal) creating files stays slow for minutes after that: a run
# started right after another measured the disk, not the servers (kernel
# CPU per durable file 175-340 us against 65-125). The cleanup leaves a
# stamp, and the next run waits until it is BENCH_SETTLE seconds old. Most
# of that slowness was ext4's search past freed inodes, which the block
# groups of its own below now avoid; what is left is small but not nothing
# (postling at 10 sessions, right after 20,000 deletions: 277-285 us per
# message, 200 s later 259-270, two runs each), so the wait stays.
settle=${BENCH_SETTLE:-180}
stamp=$base/bench-compare.cleaned
if [ -f "$stamp" ]; then
  wait_s=$(( $(stat -c %Y "$stamp") + settle - $(date +%s) ))
  if [ "$wait_s" -gt 0 ] && [ "$wait_s" -le "$settle" ]; then
    echo "== waiting ${wait_s} s for the disk to settle after the last run's cleanup (BENCH_SETTLE=$settle)" >&2
    sleep "$wait_s"
  fi
fi
work=$(mktemp -d "$base/bench-compare.XXXXXX")
# Each run gets block groups of its own. On ext4 without a journal a new
# inode is searched past every inode of its group freed in the last 60 s,
# or 360 s while their inode-table block is dirty (fs/ext4/ialloc.c,
# recently_deleted()), one buffer lookup each; and Postfix removes each
# queue file after delivery, while postling's Maildir runs delete nothing.
# With every run's directory next to the others, each postling run but the
# first could create its files among a Postfix run's thousands of fresh
# deletions (in the full comparison the effect stayed under the noise:
# 269 us per message at 10 sessions with the flag, 258-314 without).
# Measured apart (smtp-source -s 10 -m 5000 into postling, three
# alternating pairs, each right after creating and deleting 5,000 files in
# a sibling directory): 393-654 us of CPU per message, against
# 245-274 us when the parent directory has the ext4 "top directory" flag
# (chattr +T), which makes the allocator put each new directory below it,
# with the files later made in it, in a little-used block group. Postfix
# still pays for its own deletions within its run: that is its design.
chattr +T "$work" 2>/dev/null ||
  echo "== chattr +T failed on $work (not ext4?): runs share block groups" >&2
# Postfix's delivery agent runs as nobody and its daemons as postfix: they
# must be able to walk into the temp dir.
chmod 755 "$work"

# --- cleanup: only what this script started ------------------------------
pids=()       # background processes started here (postling, smtp-sink, reapers)
cgroups=()    # cgroups created here
pf_etcs=()    # private Postfix config dirs that may have a master running
cleanup() {
  set +e
  trap - ERR
  for etc in "${pf_etcs[@]}"; do
    [ -d "$etc" ] && timeout 20 postfix -c "$etc" stop >/dev/null 2>&1
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for cg in "${cgroups[@]}"; do
    [ -d "$cg" ] || continue
    # Only processes this script put there (and their children).
    for p in $(cat "$cg/cgroup.procs" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
  done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  for cg in "${cgroups[@]}"; do
    for _ in $(seq 50); do rmdir "$cg" 2>/dev/null && break; sleep 0.1; done
  done
  rm -rf "$work"
  touch "$stamp"
}
trap cleanup EXIT
failed=""
trap '[ -n "$failed" ] || { failed=1; echo "bench-compare: failed at line $LINENO: $BASH_COMMAND" >&2; }' ERR
trap 'exit 130' INT TERM

# --- helpers in Python ---------------------------------------------------
cat >"$work/bench.py" <<'PY'
import ctypes, os, signal, socket, statistics, subprocess, sys, threading, time

def files_in(d):
    try:
        return sum(1 for e in os.scandir(d) if e.is_file())
    except FileNotFoundError:
        return 0

def queue_busy(mode, dirs):
    # postling: any entry left in data_dir/queue; Postfix: any file below
    # incoming/active/deferred/hold/maildrop.
    n = 0
    for d in dirs:
        if mode == "entries":
            try:
                n += len(os.listdir(d))
            except FileNotFoundError:
                pass
        else:
            for _, _, fs in os.walk(d):
                n += len(fs)
    return n

def procs(spec):
    # spec: a cgroup directory, tree:PID (PID and all its descendants), or
    # kids:PID (only the descendants: PID is the reaper below).
    if not spec.startswith(("tree:", "kids:")):
        with open(os.path.join(spec, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    root = int(spec[5:])
    kids = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(e))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out[1:] if spec.startswith("kids:") else out

def cpu_usec(spec):
    if not spec.startswith(("tree:", "kids:")):
        st = os.path.join(spec, "cpu.stat")
        if os.path.exists(st):  # cgroup v2
            with open(st) as f:
                return int(dict(l.split() for l in f)["usage_usec"])
        with open(os.path.join(spec, "cpuacct.usage")) as f:  # cgroup v1
            return int(f.read()) // 1000
    # Fallback: utime+stime of every live process in the tree, plus what
    # the reaped ones left in their parents' cutime+cstime.
    tck = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in procs("tree:" + spec[5:]):
        try:
            with open(f"/proc/{p}/stat") as f:
                fl = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fl[11:15])
        except OSError:
            pass
    return total * 1_000_000 // tck

def mem(spec):
    rss = pss = n = 0
    for p in procs(spec):
        try:
            with open(f"/proc/{p}/status") as f:
                r = [int(l.split()[1]) for l in f if l.startswith("VmRSS:")]
            with open(f"/proc/{p}/smaps_rollup") as f:
                s = [int(l.split()[1]) for l in f if l.startswith("Pss:")]
        except OSError:
            continue
        if r:  # zombies have no VmRSS
            rss += r[0]; pss += s[0] if s else 0; n += 1
    return rss, pss, n

# Both print the wall-clock time at which the condition was first seen.
def cmd_waitfiles(d, n, timeout):
    n, end = int(n), time.monotonic() + float(timeout)
    while files_in(d) < n:
        if time.monotonic() > end:
            sys.exit(f"timeout: {files_in(d)} of {n} files in {d}")
        time.sleep(0.01)
    print(f"{time.time():.6f}")

def cmd_after(go, cmd, *args):
    # Started before a run: says it is ready (GO.ready), blocks until the
    # script closes the FIFO GO (the load has ended), then runs `cmd`.
    with open(go, "rb") as f:
        open(go + ".ready", "w").close()
        f.read()
    cmds[cmd](*args)

def cmd_waitqueue(mode, timeout, *dirs):
    end = time.monotonic() + float(timeout)
    while (left := queue_busy(mode, dirs)):
        if time.monotonic() > end:
            sys.exit(f"timeout: {left} entries still queued in {' '.join(dirs)}")
        time.sleep(0.01)
    print(f"{time.time():.6f}")

def cmd_hold(addr, n, spec, rcpt):
    # n sessions, each stopped in the middle of DATA; peak memory over 1 s.
    host, port = addr.rsplit(":", 1)
    socks = []
    for _ in range(int(n)):
        s = socket.create_connection((host, int(port)), timeout=30)
        f = s.makefile("rb")
        def reply(expect):
            while True:
                line = f.readline()
                if line[3:4] != b"-":
                    break
            if not line.startswith(expect):
                sys.exit(f"hold: session {len(socks)+1}: got {line!r}")
        reply(b"220")
        for cmd, ok in ((b"EHLO bench.test", b"250"), (b"MAIL FROM:<a@bench.test>", b"250"),
                        (f"RCPT TO:<{rcpt}>".encode(), b"250"), (b"DATA", b"354")):
            s.sendall(cmd + b"\r\n"); reply(ok)
        s.sendall(b"Subject: held open\r\n\r\n" + b"x" * 70 + b"\r\n")
        socks.append((s, f))
    peak = (0, 0, 0)
    for _ in range(10):
        time.sleep(0.1)
        m = mem(spec)
        if m[0] > peak[0]:
            peak = m
    print(*peak)
    for s, f in socks:
        s.close()

def cmd_fsync(d, n, threads, dirsync="1"):
    # The Maildir way: write into tmp/, fsync the file, rename into new/,
    # fsync new/ (unless dirsync is 0).
    n, threads, dirsync = int(n), int(threads), dirsync == "1"
    os.makedirs(f"{d}/tmp"); os.makedirs(f"{d}/new")
    body = b"x" * 4096
    def work(t):
        dfd = os.open(f"{d}/new", os.O_RDONLY | os.O_DIRECTORY)
        for i in range(t, n, threads):
            tmp = f"{d}/tmp/{t}.{i}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, body); os.fsync(fd); os.close(fd)
            os.rename(tmp, f"{d}/new/{t}.{i}")
            if dirsync:
                os.fsync(dfd)
        os.close(dfd)
    start, sys0 = time.monotonic(), os.times().system
    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ts: t.start()
    for t in ts: t.join()
    # Files per second, and the kernel's CPU time per file (the system time
    # of this process: the interpreter's own work is user time).
    print(f"{n / (time.monotonic() - start):.0f} {(os.times().system - sys0) * 1e6 / n:.0f}")

def cmd_wake(n=20000):
    # CPU time per wake-up of a process blocked in read(2): two processes
    # bounce a byte over two pipes, first both on one CPU, then on two
    # CPUs (when this process may use two). A blocking session thread pays
    # this on every SMTP command; an event loop with work queued does not.
    n = int(n)
    allowed = sorted(os.sched_getaffinity(0))
    def bounce(a, b):
        r1, w1 = os.pipe(); r2, w2 = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.sched_setaffinity(0, {b})
            for _ in range(n):
                os.read(r1, 1); os.write(w2, b"x")
            os._exit(0)
        os.sched_setaffinity(0, {a})
        t0 = os.times()
        for _ in range(n):
            os.write(w1, b"x"); os.read(r2, 1)
        os.waitpid(pid, 0)
        t1 = os.times()
        os.sched_setaffinity(0, set(allowed))
        for fd in (r1, w1, r2, w2):
            os.close(fd)
        cpu = sum(t1[i] - t0[i] for i in range(4))  # user, system, children's
        return f"{cpu * 1e6 / (2 * n):.1f}"
    same = bounce(allowed[0], allowed[0])
    across = bounce(allowed[0], allowed[1]) if len(allowed) > 1 else "-"
    print(same, across)

def cmd_reaper(cg, *argv):
    # Runs `postfix start` as a child subreaper: the daemonized master and
    # every Postfix process stay our descendants and are reaped here (no
    # zombies left to init), and the tree stays measurable without cgroups.
    # The child joins the cgroup, this process does not.
    def join():
        if cg != "-":
            with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stop Postfix with `postfix stop`
    rc = subprocess.call(argv, stdin=subprocess.DEVNULL, preexec_fn=join)
    if rc:
        sys.exit(rc)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return
        except InterruptedError:
            pass

def cmd_report(results, fsync, pf_version, wake):
    rows = [l.rstrip("\n").split("\t") for l in open(results) if l.strip()]
    def med(kind, key, server, col):
        v = [float(r[col]) for r in rows if r[0] == kind and r[1] == key and r[2] == server]
        return statistics.median(v) if v else None
    def fmt(x, unit=""):
        return "n/a" if x is None else f"{x:,.0f}{unit}"
    def ratio(a, b):
        return "n/a" if not a or not b else f"{a / b:.2f}"
    out = ["| measurement | postling | Postfix " + pf_version + " | ratio (>1: postling better) |",
           "|---|---|---|---|"]
    keys = []
    for r in rows:
        if (r[0], r[1]) not in keys:
            keys.append((r[0], r[1]))
    for kind, key in keys:
        if kind == "inbound":
            s, size = key.split("/")
            what = f"Maildir, {size}, {s} session{'s' if s != '1' else ''}"
        elif kind == "relay":
            what = f"relay to smtp-sink, {key}"
        else:
            continue
        pl, pf = med(kind, key, "postling", 3), med(kind, key, "postfix", 3)
        out.append(f"| {what}: msg/s | {fmt(pl)} | {fmt(pf)} | {ratio(pl, pf)} |")
        pl, pf = med(kind, key, "postling", 4), med(kind, key, "postfix", 4)
        out.append(f"| {what}: CPU µs/msg | {fmt(pl)} | {fmt(pf)} | {ratio(pf, pl)} |")
    for key in ("idle", "hold"):
        r = {srv: [r for r in rows if r[0] == "mem" and r[1] == key and r[2] == srv] for srv in ("postling", "postfix")}
        if not r["postling"] or not r["postfix"]:
            continue
        def m(srv, col):
            return statistics.median(float(x[col]) for x in r[srv])
        label = "idle" if key == "idle" else f"{r['postling'][0][6]} sessions in DATA"
        pl, pf = m("postling", 3), m("postfix", 3)
        out.append(f"| RSS, {label} (sum over processes) | {fmt(pl, ' KiB')} | {fmt(pf, ' KiB')} ({m('postfix', 5):.0f} processes) | {ratio(pf, pl)} |")
        pl, pf = m("postling", 4), m("postfix", 4)
        out.append(f"| PSS, {label} | {fmt(pl, ' KiB')} | {fmt(pf, ' KiB')} | {ratio(pf, pl)} |")
    print("\n".join(out))
    print()
    f = fsync.split()  # files/s and kernel µs/file: 1 thread, 8, 1 without dir fsync; before, after
    print(f"The disk's own ceiling, 4 KiB files written the Maildir way (write to tmp/, fsync, rename into new/, fsync new/), "
          f"before the runs: {f[0]} files/s from 1 thread, {f[2]} from 8 threads, {f[4]} from 1 thread without the "
          f"directory fsync; after the runs: {f[6]}, {f[8]} and {f[10]}. Kernel CPU per file, the same six: "
          f"{f[1]}, {f[3]} and {f[5]} µs before, {f[7]}, {f[9]} and {f[11]} µs after.")
    print()
    w = wake.split()
    print(f"CPU time per wake-up of a process blocked in read(2) (two processes bouncing a byte over pipes): "
          f"{w[0]} µs with both on one CPU, " + (f"{w[1]} µs with each on its own CPU" if w[1] != "-" else
          "not measured across CPUs (one CPU allowed)") + ". Every SMTP command wakes a blocked session thread once.")
    print()
    floor_keys = [k for kind, k in keys if kind == "floor"]
    if floor_keys:
        per_file = min(float(x) for x in f[1::2])
        print("An estimate of the floor under CPU per message on this machine, for any server that speaks SMTP to "
              "smtp-source and writes each message durably: Postfix's smtp-sink (one event-loop process, SMTP only, "
              "no disk) under the same load, plus the kernel CPU of one durable Maildir file, the cheapest of the six "
              f"disk measurements above ({per_file:.0f} µs). postling and Postfix are the inbound 4 KiB rows above.")
        print()
        print("| sessions | smtp-sink CPU µs/msg | + one durable file | = floor | postling | Postfix | Postfix / 10 |")
        print("|---|---|---|---|---|---|---|")
        for k in floor_keys:
            sink = med("floor", k, "smtp-sink", 4)
            pl, pf = med("inbound", k, "postling", 4), med("inbound", k, "postfix", 4)
            print(f"| {k.split('/')[0]} | {fmt(sink)} | {per_file:.0f} | {fmt(sink + per_file if sink is not None else None)} | {fmt(pl)} | {fmt(pf)} "
                  f"| {fmt(pf / 10 if pf else None)} |")
        print()
    print("Every run, in the order run (time: from the first message sent until the last is in new/, or for relay until "
          "the queue is empty; disk: 50 Maildir-style files with fsync from 1 thread, just before the run):")
    print()
    print("| run | server | test | time | msg/s | CPU µs/msg | disk files/s |")
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(x for x in rows if x[0] != "mem"):
        print(f"| {i + 1} | {'Postfix' if r[2] == 'postfix' else r[2]} | {r[0]} {r[1]} | {float(r[5]):.2f} s "
              f"| {float(r[3]):,.0f} | {float(r[4]):,.0f} | {r[6]} |")

def cmd_splice(path, section, name="bench-compare"):
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = open(path).read()
    new = begin + "\n" + open(section).read().strip("\n") + "\n" + end
    if begin in text and end in text:
        a, b = text.index(begin), text.index(end) + len(end)
        text = text[:a] + new + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    with open(path, "w") as f:
        f.write(text)

cmds = {"after": cmd_after, "waitfiles": cmd_waitfiles, "waitqueue": cmd_waitqueue, "hold": cmd_hold,
        "fsync": cmd_fsync, "wake": cmd_wake, "reaper": cmd_reaper, "report": cmd_report, "splice": cmd_splice,
        "cpu": lambda spec: print(cpu_usec(spec)), "mem": lambda spec: print(*mem(spec)),
        "freeport": lambda: (s := socket.socket(), s.bind(("127.0.0.1", 0)), print(s.getsockname()[1]))}
cmds[sys.argv[1]](*sys.argv[2:])
PY
py() { python3 "$work/bench.py" "$@"; }
now() { date +%s.%N; }

# --- CPU accounting: one cgroup around each server -------------------------
# cgroup v2 (unified, or the hybrid layout's /sys/fs/cgroup/unified) with
# cpu.stat, else v1 cpuacct, else /proc sums over the server's process tree.
cg_base="" cg_kind=proc
for d in /sys/fs/cgroup /sys/fs/cgroup/unified; do
  if [ "$(stat -fc %T "$d" 2>/dev/null)" = cgroup2fs ] && mkdir "$d/bench-compare-probe-$$" 2>/dev/null; then
    ok=0; [ -f "$d/bench-compare-probe-$$/cpu.stat" ] && ok=1
    rmdir "$d/bench-compare-probe-$$"
    if [ $ok = 1 ]; then cg_base=$d cg_kind=v2; break; fi
  fi
done
if [ -z "$cg_base" ] && [ -f /sys/fs/cgroup/cpuacct/cpuacct.usage ] &&
  mkdir "/sys/fs/cgroup/cpuacct/bench-compare-probe-$$" 2>/dev/null; then
  rmdir "/sys/fs/cgroup/cpuacct/bench-compare-probe-$$"
  cg_base=/sys/fs/cgroup/cpuacct cg_kind=v1
fi
echo "== CPU accounting: ${cg_kind}${cg_base:+ ($cg_base)}" >&2
cg_seq=0
cg_new() { # sets CG (a new, empty cgroup, or "-" without cgroups)
  CG=-
  [ -n "$cg_base" ] || return 0
  cg_seq=$((cg_seq + 1))
  CG=$cg_base/bench-compare-$$-$cg_seq
  mkdir "$CG"
  cgroups+=("$CG")
}
cg_rm() { # waits for the cgroup to empty, then removes it
  [ "$1" != - ] || return 0
  for _ in $(seq 100); do
    [ -z "$(cat "$1/cgroup.procs")" ] && rmdir "$1" && return 0
    sleep 0.1
  done
  echo "bench-compare: cgroup $1 did not empty" >&2
  return 1
}

# --- servers ---------------------------------------------------------------
# start_postling MODE / start_postfix MODE (MODE: local or relay) set
#   SRV_PORT, SRV_SPEC (cgroup dir or tree:PID for CPU and memory),
#   SRV_NEW (the Maildir's new/), SRV_QMODE + SRV_QDIRS (the queue to drain),
#   SRV_LOG, and stop_server stops it again.
sink_port=""
sink_user=(-u nobody) # smtp-sink refuses to run as root without -u
# wait_listen PORT PID: waits (up to 10 s) until something listens on
# 127.0.0.1:PORT, or PID has exited; fails if nothing listens.
wait_listen() {
  for _ in $(seq 200); do
    [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ] && return 0
    kill -0 "$2" 2>/dev/null || break
    sleep 0.05
  done
  [ -n "$(ss -Hltn "sport = :$1")" ]
}
run_seq=0
SRV=""

start_postling() {
  local mode=$1 d
  run_seq=$((run_seq + 1))
  d=$work/postling.$run_seq
  mkdir -p "$d"
  cat >"$d/postling.toml" <<TOML
hostname = "bench-host.test"
[limits]
max_connections = 1000
max_connections_per_ip = 1000
max_messages_per_minute_per_ip = 0
[local]
domains = ["bench.test"]
maildir_root = "$d/mail"
users = ["user"]
TOML
  if [ "$mode" = relay ]; then
    printf '[relay]\nsmarthost = "127.0.0.1:%s"\nsmarthost_tls = "none"\n' "$sink_port" >>"$d/postling.toml"
  fi
  cg_new
  (
    [ "$CG" = - ] || echo "$BASHPID" >"$CG/cgroup.procs"
    exec "$bin" serve --config "$d/postling.toml" --listen 127.0.0.1:0 --data-dir "$d/data"
  ) 2>"$d/log" &
  SRV_PID=$!
  pids+=("$SRV_PID")
  for _ in $(seq 200); do
    grep -q 'listening addr=' "$d/log" && break
    kill -0 "$SRV_PID" 2>/dev/null || break
    sleep 0.05
  done
  SRV_PORT=$(grep -m1 -o 'listening addr=[^ ]*' "$d/log" | cut -d: -f2)
  [ -n "$SRV_PORT" ] || { echo "postling did not start:" >&2; cat "$d/log" >&2; exit 1; }
  SRV=postling SRV_DIR=$d SRV_CG=$CG SRV_LOG=$d/log
  if [ "$CG" = - ]; then SRV_SPEC=tree:$SRV_PID; else SRV_SPEC=$CG; fi
  SRV_NEW=$d/mail/user/new SRV_QMODE=entries SRV_QDIRS=("$d/data/queue")
}

start_postfix() {
  local mode=$1 d etc port
  run_seq=$((run_seq + 1))
  d=$work/postfix.$run_seq
  etc=$d/etc
  mkdir -p "$etc" "$d/queue" "$d/data" "$d/vmail"
  chown postfix:postfix "$d/data"
  chown nobody:nogroup "$d/vmail"
  port=$(py freeport)
  # A private instance: its own config, queue and data directories, smtpd
  # on a loopback port, virtual(8) delivery into a Maildir. Durability is
  # Postfix's default (queue files and Maildir files are fsynced).
  cat >"$etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $d/queue
data_directory = $d/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = $d/maillog
maillog_file_prefixes = $d
myhostname = bench-host.test
mydomain = bench-host.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination = localhost
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
biff = no
virtual_mailbox_domains = bench.test
virtual_mailbox_base = $d/vmail
virtual_mailbox_maps = texthash:$etc/vmailbox
virtual_uid_maps = static:$(id -u nobody)
virtual_gid_maps = static:$(getent group nogroup | cut -d: -f3)
# Enough processes for $hold sessions at once from one address.
default_process_limit = $((hold + 100))
smtpd_client_connection_count_limit = 0
# Nothing leaves loopback: no DNS for outbound mail.
smtp_dns_support_level = disabled
smtp_host_lookup = native
EOF
  if [ "$mode" = relay ]; then echo "relayhost = [127.0.0.1]:$sink_port" >>"$etc/main.cf"; fi
  echo "user@bench.test user/" >"$etc/vmailbox"
  # Debian's master.cf services, without chroot, and no TLS manager.
  cat >"$etc/master.cf" <<EOF
127.0.0.1:$port inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
local unix - n n - - local
virtual unix - n n - - virtual
lmtp unix - - n - - lmtp
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
EOF
  cg_new
  pf_etcs+=("$etc")
  python3 "$work/bench.py" reaper "$CG" postfix -c "$etc" start >/dev/null 2>&1 &
  SRV_PID=$!
  pids+=("$SRV_PID")
  wait_listen "$port" "$SRV_PID" ||
    { echo "Postfix did not start:" >&2; cat "$d/maillog" >&2 2>/dev/null; exit 1; }
  SRV=postfix SRV_DIR=$d SRV_CG=$CG SRV_LOG=$d/maillog SRV_PORT=$port SRV_ETC=$etc
  if [ "$CG" = - ]; then SRV_SPEC=kids:$SRV_PID; else SRV_SPEC=$CG; fi
  SRV_NEW=$d/vmail/user/new SRV_QMODE=files
  SRV_QDIRS=("$d/queue/incoming" "$d/queue/active" "$d/queue/deferred" "$d/queue/hold" "$d/queue/maildrop")
}

# smtp-sink in a cgroup of its own: the SMTP dialogue with no disk at all,
# to compare CPU per message against (kind "floor" in timed_run).
start_sink() {
  run_seq=$((run_seq + 1))
  SRV_PORT=$(py freeport)
  cg_new
  (
    [ "$CG" = - ] || echo "$BASHPID" >"$CG/cgroup.procs"
    exec smtp-sink "${sink_user[@]}" 127.0.0.1:"$SRV_PORT" 1000
  ) >"$work/sink.$run_seq.log" 2>&1 &
  SRV_PID=$!
  pids+=("$SRV_PID")
  wait_listen "$SRV_PORT" "$SRV_PID" ||
    { echo "smtp-sink did not start:" >&2; cat "$work/sink.$run_seq.log" >&2; exit 1; }
  SRV=smtp-sink SRV_CG=$CG SRV_LOG=$work/sink.$run_seq.log
  if [ "$CG" = - ]; then SRV_SPEC=tree:$SRV_PID; else SRV_SPEC=$CG; fi
}

stop_server() {
  [ -n "$SRV" ] || return 0
  if [ "$SRV" = postfix ]; then
    postfix -c "$SRV_ETC" stop >/dev/null 2>&1 || true
  else
    kill "$SRV_PID" 2>/dev/null || true
  fi
  # Bounded: postling waits up to 30 s for sessions, postfix stop 5 s.
  for _ in $(seq 400); do kill -0 "$SRV_PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$SRV_PID" 2>/dev/null || true
  wait "$SRV_PID" 2>/dev/null || true
  cg_rm "$SRV_CG"
  # The run's files stay until the exit trap removes $work: deleting
  # thousands of files here would slow the next run's file creation (this
  # VM's ext4 has no journal, and a new inode is searched past recently
  # freed ones), charging one server's cleanup to the other's run.
  SRV=""
}

results=$work/results.tsv
probe_seq=0
: >"$results"

# One timed run: smtp-source into the running server, then wait for the
# Maildir (local) or the empty queue (relay). Appends to $results:
# kind key server msg/s cpu_us_per_msg seconds
timed_run() {
  local kind=$1 key=$2 s=$3 m=$4 size=$5 rcpt=$6 c0 c1 t0 t1 f probe
  # The disk right now (it drifts): 50 Maildir-style files from 1 thread.
  # Kept until the end, like every file written here (see stop_server).
  probe_seq=$((probe_seq + 1))
  probe=$(py fsync "$work/probe.$probe_seq" 50 1 | cut -d' ' -f1)
  c0=$(py cpu "$SRV_SPEC")
  # The end-of-run watcher is started before the clock: the interpreter's
  # start-up (~0.1 s here) would otherwise be counted in every run, a
  # sixth of a 0.7 s one. It waits on a FIFO until smtp-source has ended.
  local go=$work/go.$probe_seq watcher=""
  if [ "$kind" != floor ]; then
    mkfifo "$go"
    if [ "$kind" = inbound ]; then
      py after "$go" waitfiles "$SRV_NEW" "$m" "$run_timeout" >"$go.t1" &
    else
      py after "$go" waitqueue "$SRV_QMODE" "$run_timeout" "${SRV_QDIRS[@]}" >"$go.t1" &
    fi
    watcher=$!
    exec {gofd}<>"$go" # read-write: never blocks, and keeps the FIFO open
    for _ in $(seq 500); do
      [ -e "$go.ready" ] && break
      kill -0 "$watcher" 2>/dev/null || break
      sleep 0.01
    done
    [ -e "$go.ready" ] || { echo "bench-compare: the end-of-run watcher did not start" >&2; exit 1; }
  fi
  t0=$(now)
  timeout "$run_timeout" smtp-source -s "$s" -m "$m" -l "$size" -f a@bench.test -t "$rcpt" 127.0.0.1:"$SRV_PORT"
  if [ "$kind" = floor ]; then
    t1=$(now) # smtp-sink answered 250 to every message
  else
    exec {gofd}>&- # the watcher starts looking
    wait "$watcher"
    t1=$(cat "$go.t1")
    if [ "$kind" = inbound ]; then
      py waitqueue "$SRV_QMODE" 60 "${SRV_QDIRS[@]}" >/dev/null
    fi
  fi
  c1=$(py cpu "$SRV_SPEC")
  # Check the mail really arrived.
  if [ "$kind" = inbound ]; then
    f=$(find "$SRV_NEW" -type f -print -quit)
    # (Postfix stores LF line endings, so a file can be ~2% under -l SIZE.)
    grep -q '^Delivered-To: user@bench.test' "$f" && [ "$(stat -c %s "$f")" -ge $((size * 9 / 10)) ] ||
      { echo "bad delivery in $f" >&2; head -20 "$f" >&2; exit 1; }
    [ "$(find "$SRV_NEW" -type f | wc -l)" = "$m" ] || { echo "wrong message count in $SRV_NEW" >&2; exit 1; }
  elif [ "$kind" = relay ]; then
    for _ in $(seq 50); do [ "$(grep -c 'status=sent' "$SRV_LOG")" -ge "$m" ] && break; sleep 0.1; done
    [ "$(grep -c 'status=sent' "$SRV_LOG")" = "$m" ] ||
      { echo "$SRV: $(grep -c 'status=sent' "$SRV_LOG") of $m relayed" >&2; tail "$SRV_LOG" >&2; exit 1; }
  fi
  python3 - "$kind" "$key" "$SRV" "$m" "$t0" "$t1" "$c0" "$c1" "$probe" >>"$results" <<'PY'
import sys
kind, key, srv, m, t0, t1, c0, c1, probe = sys.argv[1:]
secs = float(t1) - float(t0)
print(f"{kind}\t{key}\t{srv}\t{int(m) / secs:.1f}\t{(int(c1) - int(c0)) / int(m):.0f}\t{secs:.3f}\t{probe}")
PY
  tail -1 "$results" | awk -F'\t' '{printf "   %-8s %-7s %-14s %8.1f msg/s %7d us/msg %7.2f s  (disk probe %s files/s)\n", $3, $1, $2, $4, $5, $6, $7}' >&2
}

# --- 5. the disk's fsync ceiling, before (and after) the runs -------------
# Its files stay until the end too: deleting them would slow the first
# server run that follows (see stop_server).
fsync_ceiling() {
  local a b c
  a=$(py fsync "$work/fsync1.$1" "$fsync_n" 1)
  b=$(py fsync "$work/fsync8.$1" "$fsync_n" 8)
  c=$(py fsync "$work/fsync1n.$1" "$fsync_n" 1 0)
  echo "$a $b $c"
}
echo "== disk: Maildir-style writes with fsync, $fsync_n files" >&2
fsync_before=$(fsync_ceiling before)
echo "   $fsync_before files/s and kernel µs/file: 1 thread, 8 threads, 1 thread without dir fsync" >&2
echo "== wake-up cost: one CPU, two CPUs" >&2
wake=$(py wake)
echo "   $wake µs of CPU per wake-up" >&2
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

# --- 1-3. inbound to Maildir, CPU per message, relay ----------------------
for size in 4096 102400; do
  if [ $size = 4096 ]; then m=$m4k label="4 KiB"; else m=$m100k label="100 KiB"; fi
  for s in "${sessions[@]}"; do
    echo "== inbound to Maildir: $s sessions, $m messages of $label" >&2
    for _ in $(seq "$reps"); do
      for server in postling postfix; do
        "start_$server" local
        timed_run inbound "$s/$label" "$s" "$m" "$size" user@bench.test
        stop_server
      done
    done
  done
done

# --- 6. the floor: the same SMTP load into smtp-sink, no disk -------------
for s in "${sessions[@]}"; do
  [ "$s" = 1 ] && continue
  echo "== floor: smtp-sink, $s sessions, $m4k messages of 4 KiB" >&2
  for _ in $(seq "$reps"); do
    start_sink
    timed_run floor "$s/4 KiB" "$s" "$m4k" 4096 user@bench.test
    stop_server
  done
done

sink_port=$(py freeport)
smtp-sink "${sink_user[@]}" 127.0.0.1:"$sink_port" 1000 &
sink_pid=$!
pids+=("$sink_pid")
wait_listen "$sink_port" "$sink_pid" || { echo "smtp-sink did not start" >&2; exit 1; }
echo "== relay to smtp-sink: $relay_s sessions, $relay_m messages of 4 KiB" >&2
for _ in $(seq "$reps"); do
  for server in postling postfix; do
    "start_$server" relay
    timed_run relay "$relay_s sessions, 4 KiB" "$relay_s" "$relay_m" 4096 user@remote.test
    stop_server
  done
done
kill "$sink_pid"; wait "$sink_pid" 2>/dev/null || true

# --- 4. memory --------------------------------------------------------------
echo "== memory: idle, and $hold sessions in DATA" >&2
for _ in $(seq "$reps"); do
  for server in postling postfix; do
    "start_$server" local
    sleep 1
    read -r rss pss n < <(py mem "$SRV_SPEC")
    printf 'mem\tidle\t%s\t%s\t%s\t%s\t-\n' "$SRV" "$rss" "$pss" "$n" >>"$results"
    read -r rss pss n < <(py hold 127.0.0.1:"$SRV_PORT" "$hold" "$SRV_SPEC" user@bench.test)
    printf 'mem\thold\t%s\t%s\t%s\t%s\t%s\n' "$SRV" "$rss" "$pss" "$n" "$hold" >>"$results"
    tail -2 "$results" | sed 's/^/   /' >&2
    stop_server
  done
done

load_after=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== disk again" >&2
fsync_after=$(fsync_ceiling after)
echo "   $fsync_after files/s and kernel µs/file: 1 thread, 8 threads, 1 thread without dir fsync" >&2

# --- the table -----------------------------------------------------------
cmd="scripts/bench-compare.sh${1:+ $1}"
envs=$(env | grep '^BENCH_' | sort | tr '\n' ' ' || true)
mem_total=$(awk '/^MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
debian=$(cat /etc/debian_version 2>/dev/null || echo "?")
section=$work/section.md
{
  if [ -n "$cpus" ]; then
    echo "## Comparison with Postfix $pf_version, everything on CPUs $cpus"
  else
    echo "## Comparison with Postfix $pf_version"
  fi
  echo
  echo "$(date -u +%Y-%m-%d), \`${envs}${cmd}\` (commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo ', uncommitted changes'))."
  echo "Machine: $(uname -m), $(nproc --all) CPUs${cpus:+ (runs pinned to CPUs $cpus with taskset)}, $mem_total RAM, kernel $(uname -r), Debian $debian;"
  echo "Load average $load_before before the runs, $load_after after (other work on the machine shows here)."
  echo "postling binary $(python3 -c "print(f'{$bin_size:,}')") bytes (release profile). CPU: $cg_kind${cg_base:+ cgroup} around each server's processes."
  echo "Counts: $m4k messages of 4 KiB and $m100k of 100 KiB per inbound run, $relay_m per relay run;"
  echo "$reps run(s) per server and configuration, alternating, median shown."
  cat <<'EOF'

How: each run starts the server fresh on a loopback port, runs
`smtp-source -s S -m M -l SIZE -f a@bench.test -t user@bench.test` (one
message per connection), and stops the clock when the M-th file is in the
Maildir's `new/` (relay: when the queue is empty again; the smarthost is
`smtp-sink`, no disk). postling: `postling serve` with `[local] domains =
["bench.test"]`, `users = ["user"]`, connection limits raised to 1000 (all
sessions come from 127.0.0.1); relay with `smarthost_tls = "none"`.
Each run's files, and the disk probes' files, stay until the script ends:
deleting thousands of files between runs would slow the next run's file
creation on this VM's ext4 (no journal: a new inode is searched past the
ones of its block group freed in the last 60 to 360 seconds). For the same
reason the temp directory has the ext4 top-directory flag (`chattr +T`),
so each run's directory, and the files in it, go into a block group away
from the files earlier runs deleted (each Postfix run removes its queue
files as it goes).
Postfix: a private instance (`postfix -c DIR start`, own config, queue and
data directories, smtpd on `127.0.0.1:PORT` in master.cf, no chroot),
`inet_interfaces = 127.0.0.1`, delivery by virtual(8) into
`virtual_mailbox_base/user/` (a Maildir), `default_process_limit` raised to
sessions held + 100 and `smtpd_client_connection_count_limit = 0`, no DNS
for outbound mail (`smtp_dns_support_level = disabled`), relay through
`relayhost = [127.0.0.1]:SINKPORT`; every other setting is Postfix's
default, durability included (queue file and Maildir file fsynced). CPU is
the CPU time of a cgroup holding only the server (cgroup v2 `cpu.stat`
`usage_usec`, or v1 `cpuacct.usage`; all its processes, exited children
included; without cgroups, /proc utime+stime of the process tree) from
before the first message to after the queue is empty, divided by messages;
smtp-source is outside it. Memory: VmRSS and Pss (`smaps_rollup`) summed over the
server's processes 1 s after start, and the peak over 1 s while the held
sessions each sit in DATA; Postfix's RSS counts its shared libraries once
per process, PSS shares them out.

EOF
  py report "$results" "$fsync_before $fsync_after" "$pf_version" "$wake"
} >"$section"
echo
cat "$section"
if [ "$write" = 1 ]; then
  py splice "$repo/BENCHMARKS.md" "$section" "bench-compare${cpus:+-pinned}"
  echo "== BENCHMARKS.md updated" >&2
fi
