#!/usr/bin/env python3
"""Structured fuzz of nvfp4's load path, for a set time (issue 17):

    python3 tools/fuzz_load.py --minutes 5 [--jobs N] [--seed S] [--binary PATH] [--timeout T]

Each case copies a seed model directory (testdata/tiny-a..d, models/v4-small) to a scratch
folder, mutates it (1 to 3 mutations: a JSON file edited as a tree, keys duplicated, misspelled,
values swapped for edge values, strings given control characters or NUL; a safetensors header
edited the same way, its length field or its data bytes changed; a file truncated, emptied,
removed or replaced by a directory, a FIFO or a symbolic link), then runs the sanitizer build of
nvfp4 (--cpu) on it in one of its modes: a prompt (greedy, sampled, --chat, --special, small
--chunk), -i with good and bad lines, --tokenize, --ids, --perplexity, --dump-logits to a file
outside the model. A case is a finding when the run
  - dies of a signal, or AddressSanitizer / UndefinedBehaviorSanitizer reports an error;
  - hangs: is still running after --timeout seconds (default 60);
  - writes inside the model directory: an entry added or removed, a file's size, mtime or bytes
    changed (and, at the end, any change to the seed directories themselves);
  - exits with a status other than 0 or 1 (2 would be a bad command line: a harness bug), with
    1 but no "nvfp4: error:" line, or leaves files beside its --dump-logits target other than
    the complete target after a run that succeeded;
  - prints on stderr a line that does not begin with "nvfp4: " (a message split over lines) or
    carries a raw control character (the messages escape them).

Standard library only. The sanitizer build is made from nvfp4.c with the Makefile's SANITIZE
flags as build/fuzz/nvfp4-sanitize (unless --binary names one). Each finding keeps its case
under build/fuzz/findings/NNN/ (model directory, command line, stdin, stdout, stderr, the
mutations). The summary counts cases per mode, exit status and the most frequent refusals.
Exit status 1 when anything was found.
"""
import argparse, collections, concurrent.futures, hashlib, json, os, random, re, shlex, shutil, signal, subprocess, sys
import tempfile, threading, time, traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = ["testdata/tiny-a", "testdata/tiny-b", "testdata/tiny-c", "testdata/tiny-d", "models/v4-small"]
JSON_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"]
SANITIZER = re.compile(rb"ERROR: AddressSanitizer|runtime error:|ERROR: UndefinedBehaviorSanitizer|ERROR: LeakSanitizer|"
                       rb"AddressSanitizer:DEADLYSIGNAL")


# ----------------------------------------------------------------------------- JSON as a tree
# Objects are kept as lists of [key, value] pairs (class Obj), so that a file's duplicate keys
# survive and a mutation can add some; Raw is JSON text written as it is (NaN, 1e999, nesting).

class Obj(list):
    pass


class Raw(str):
    pass


def load_tree(data):
    return json.loads(data.decode("utf-8", "surrogatepass"), object_pairs_hook=lambda pairs: Obj([list(p) for p in pairs]))


def dump_tree(v, rng):
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, Obj):
        return "{" + ", ".join(dump_tree(k, rng) + ": " + dump_tree(x, rng) for k, x in v) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(dump_tree(x, rng) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=rng.random() < 0.5)
    return json.dumps(v)


def containers(v, path=()):
    """Every (path, node) of the tree: path is a tuple of indexes into lists / pair lists."""
    yield path, v
    if isinstance(v, Obj):
        for i, (_, x) in enumerate(v):
            yield from containers(x, path + (i,))
    elif isinstance(v, list) and not isinstance(v, Raw):
        for i, x in enumerate(v):
            yield from containers(x, path + (i,))


def walk(tree, rng):
    """A node reached by a random walk from the root that stops at each level with
    probability 0.35: top-level keys are hit as often as vocabulary entries. Returns (parent,
    index in the parent, node); parent is None for the root."""
    parent, index, node = None, None, tree
    while True:
        children = len(node) if isinstance(node, (Obj, list)) and not isinstance(node, Raw) else 0
        if not children or (parent is not None and rng.random() < 0.35):
            return parent, index, node
        i = rng.randrange(children)
        parent, index, node = node, i, node[i][1] if isinstance(node, Obj) else node[i]


INTS = [0, 1, -1, 2, 3, 4, 7, 8, 16, 64, 127, 128, 255, 256, 1023, 1024, 4096, 65535, 65536, 2**31 - 1, 2**31, 2**32,
        2**53 + 1, 2**63, 2**64, -2**31, 10**9, 10**9 + 1, 10**30]
FLOATS = [0.5, 1.5, -0.0, 1e-300, 5e-324, 1e300, 3.4e38, 3.5e38, 0.1, 2.5]
RAWS = ["1e999", "-1e999", "NaN", "Infinity", "0x10", "01", "1.", ".5", "-", "1e", "+1", "00", "1E400", "-0",
        "\"\\ud800\"", "\"\\udc00x\"", "\"a\\u0000b\"", "[" * 3000 + "]" * 3000, "{\"a\":" * 2000 + "1" + "}" * 2000]
STRINGS = ["", "x", "BF16", "F8_E4M3", "U8", "I64", "BF16\x00garbage", "a" * 5000, "\r\n\x1b[31mred\x1b[0m\x07",
           "\x1b]0;title\x07", "\u009b31m", "../model-00001-of-00002.safetensors", "/etc/passwd", ".", "..",
           "model.safetensors", "\x00", "<｜User｜>", "yarn", "default", "sqrtsoftplus", "deepseek_v4", "é€😀",
           "\\p{N}{1,3}", "\ud800"]
KEYS = ["rope_scaling", "rope_scal[[[[ing", "Vocab_Size", "vocab_sizes", "factor", "add_bos_token", "__metadata__",
        "weight_map", "dtype", "shape", "data_offsets", "type", "x\x00y", "\x1b[2J", "", "main", "compress"]


def edge_value(rng):
    r = rng.random()
    if r < 0.3:
        return rng.choice(INTS)
    if r < 0.4:
        return rng.choice(FLOATS)
    if r < 0.55:
        return Raw(rng.choice(RAWS))
    if r < 0.8:
        return rng.choice(STRINGS)
    return rng.choice([None, True, False, [], Obj(), [0, 1], Obj([["a", 1]]), [[[]]]])


def mutate_string(s, rng):
    ops = [lambda: s[: rng.randrange(len(s) + 1)],
           lambda: s + rng.choice(["\r\n\x1b[1m", "\x00", "\x7f", "\u0085", "\n"]),
           lambda: s[: len(s) // 2] + rng.choice(["\x00", "\x1b", "\r", "\t", "/", "..", "\ud800"]) + s[len(s) // 2:],
           lambda: s[::-1], lambda: s.upper(), lambda: s * rng.choice([2, 100]), lambda: rng.choice(STRINGS)]
    return rng.choice(ops)()


def mutate_tree(tree, rng):
    """One edit of the tree, described in a short string; returns (tree, description)."""
    parent, index, node = walk(tree, rng)
    op = rng.random()
    if isinstance(node, Obj) and node and op < 0.45:
        i = rng.randrange(len(node))
        key = node[i][0]
        kind = rng.choice(["delete", "duplicate", "rename", "add", "swap"])
        if kind == "delete":
            del node[i]
        elif kind == "duplicate":
            node.insert(rng.randrange(len(node) + 1), [key, edge_value(rng) if rng.random() < 0.5 else node[i][1]])
        elif kind == "rename":
            node[i][0] = rng.choice([mutate_string(key, rng), rng.choice(KEYS)])
        elif kind == "add":
            node.insert(rng.randrange(len(node) + 1), [rng.choice(KEYS), edge_value(rng)])
        else:
            j = rng.randrange(len(node))
            node[i][1], node[j][1] = node[j][1], node[i][1]
        return tree, "%s key %r" % (kind, key[:40])
    if isinstance(node, list) and not isinstance(node, (Obj, Raw)) and node and op < 0.45:
        kind = rng.choice(["truncate", "repeat", "delete", "empty"])
        if kind == "truncate":
            del node[rng.randrange(len(node)):]
        elif kind == "repeat":
            node.insert(rng.randrange(len(node) + 1), node[rng.randrange(len(node))])
        elif kind == "delete":
            del node[rng.randrange(len(node))]
        else:
            node.clear()
        return tree, "%s list" % kind
    if isinstance(node, str) and not isinstance(node, Raw) and op < 0.7:
        new = mutate_string(node, rng)
    elif isinstance(node, (int, float)) and not isinstance(node, bool) and op < 0.7:
        new = rng.choice([node + 1, node - 1, -node, node * 2, node * 1000, 0, edge_value(rng)])
    else:
        new = edge_value(rng)
    if parent is None:
        return new, "root replaced"
    if isinstance(parent, Obj):
        parent[index][1] = new
    else:
        parent[index] = new
    return tree, "value %r -> %r" % (str(node)[:30], str(new)[:30])


# --------------------------------------------------------------------------- file mutations

def mutate_json_file(path, rng):
    with open(path, "rb") as f:
        data = f.read()
    try:
        tree = load_tree(data)
    except (ValueError, RecursionError):   # not JSON (an earlier mutation), or nested past Python's limit
        return mutate_bytes(path, rng)
    tree, what = mutate_tree(tree, rng)
    with open(path, "wb") as f:
        f.write(dump_tree(tree, rng).encode("utf-8", "surrogatepass"))
    return "%s: %s" % (os.path.basename(path), what)


def mutate_bytes(path, rng, start=0, end=None):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    end = len(data) if end is None else end
    kind = rng.choice(["flip", "insert", "delete", "truncate", "control"])
    at = rng.randrange(start, end + 1) if end >= start else 0
    if kind == "flip" and end > start:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
    elif kind == "insert":
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif kind == "delete":
        del data[at:at + rng.randint(1, 64)]
    elif kind == "truncate":
        del data[at:]
    else:
        data[at:at] = rng.choice([b"\r\n\x1b[31m", b"\x00", b"\\u0000", b"\\u001b", b"\xff\xfe", b"\xc3("])
    with open(path, "wb") as f:
        f.write(data)
    return "%s: bytes %s at %d" % (os.path.basename(path), kind, at)


def mutate_safetensors(path, rng):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if len(data) < 8:
        return mutate_bytes(path, rng)
    h = int.from_bytes(data[:8], "little")
    kind = rng.random()
    if kind < 0.55 and 8 + h <= len(data):   # the header as a tree
        try:
            tree = load_tree(bytes(data[8:8 + h]))
        except (ValueError, RecursionError):
            return mutate_bytes(path, rng, 8, min(len(data), 8 + h))
        tree, what = mutate_tree(tree, rng)
        header = dump_tree(tree, rng).encode("utf-8", "surrogatepass")
        header += b" " * rng.choice([0, 0, 0, 3])
        data[:8 + h] = len(header).to_bytes(8, "little") + header
        with open(path, "wb") as f:
            f.write(data)
        return "%s header: %s" % (os.path.basename(path), what)
    if kind < 0.65:
        new = rng.choice([0, 1, 7, h - 1, h + 1, len(data) - 8, len(data), 2**63, 2**64 - 1])
        data[:8] = (new % 2**64).to_bytes(8, "little")
        with open(path, "wb") as f:
            f.write(data)
        return "%s: header length %d -> %d" % (os.path.basename(path), h, new)
    if kind < 0.8 and len(data) > 8 + h + 2:   # data bytes: NaN, inf, noise
        for _ in range(rng.randint(1, 16)):
            at = rng.randrange(8 + h, len(data) - 1)
            data[at:at + 2] = rng.choice([b"\xc0\x7f", b"\x80\x7f", b"\xff\xff", b"\x00\x00"])
        with open(path, "wb") as f:
            f.write(data)
        return "%s: data bytes set to NaN/inf/noise" % os.path.basename(path)
    return mutate_bytes(path, rng)


def mutate_entry(path, rng):
    """Replace a whole file: empty, gone, a directory, a FIFO, a symbolic link."""
    kind = rng.choice(["empty", "remove", "directory", "fifo", "symlink-zero", "symlink-loop", "symlink-dangling"])
    os.remove(path)
    if kind == "empty":
        open(path, "wb").close()
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-zero":
        os.symlink("/dev/zero", path)
    elif kind == "symlink-loop":
        os.symlink(os.path.basename(path), path)
    elif kind == "symlink-dangling":
        os.symlink("no-such-file", path)
    return "%s: %s" % (os.path.basename(path), kind)


def mutate_model(model, rng):
    files = [f for f in sorted(os.listdir(model)) if f.endswith((".json", ".safetensors"))]
    files = [f for f in files if os.path.isfile(os.path.join(model, f)) and not os.path.islink(os.path.join(model, f))]
    if not files:
        return "nothing left to mutate"
    name = rng.choice(files)
    path = os.path.join(model, name)
    r = rng.random()
    if r < 0.08:
        return mutate_entry(path, rng)
    if name.endswith(".safetensors"):
        return mutate_safetensors(path, rng)
    if r < 0.85:
        return mutate_json_file(path, rng)
    return mutate_bytes(path, rng)


# -------------------------------------------------------------------------------- the runs

PROMPTS = ["Once upon a time", "hi", "<｜User｜>hi<｜Assistant｜>", "é€😀 日本", "a\tb\nc"]
MODES = ["greedy", "sampled", "chat", "special", "chunk", "interactive", "tokenize", "ids", "perplexity", "dump"]


def command(mode, binary, model, case, rng):
    """The argv and stdin of a run in `mode`, in the case's folder `case` (model: its model
    directory, relative to it)."""
    base = [binary, model] + (["--cpu"] if mode != "tokenize" else [])   # --tokenize runs no model
    prompt = rng.choice(PROMPTS)
    stdin = b""
    if mode == "greedy":
        args = [prompt, "-n", "4", "--temp", "0", "--ctx", "96"]
    elif mode == "sampled":
        args = [prompt, "-n", "4", "--temp", "0.9", "--top-p", "0.9", "--seed", str(rng.randrange(1000)), "--ctx", "96"]
    elif mode == "chat":
        args = [prompt, "--chat", "-n", "4", "--temp", "0", "--ctx", "96"]
    elif mode == "special":
        args = [prompt, "--chat", "--special", "-n", "3", "--temp", "0", "--ctx", "96"]
    elif mode == "chunk":
        args = [prompt, "-n", "2", "--temp", "0", "--chunk", str(rng.choice([1, 3, 7])), "--ctx", "96"]
    elif mode == "interactive":
        args = ["-i", "-n", "3", "--temp", "0", "--ctx", "128"]
        stdin = b"It was\n\xff\nab\x00cd\n<\xef\xbd\x9cUser\xef\xbd\x9c>x\nof times\n/exit\n"
    elif mode == "tokenize":
        args = [prompt, "--tokenize"] + rng.choice([[], ["--chat"], ["--special"]])
    elif mode == "ids":
        args = ["--ids", ",".join(str(rng.choice([0, 1, 2, 5, 100, 1000, 4095])) for _ in range(rng.randint(1, 6))),
                "-n", "3", "--temp", "0", "--ctx", "96"]
    elif mode == "perplexity":
        with open(os.path.join(ROOT, "testdata/heldout.txt"), "rb") as f, open(os.path.join(case, "text.txt"), "wb") as g:
            g.write(f.read(rng.choice([40, 300, 900])))
        args = ["--perplexity", "text.txt", "--ctx", str(rng.choice([16, 64])), "--chunk", str(rng.choice([5, 64]))]
    else:
        args = [prompt, "-n", "3", "--temp", "0", "--ctx", "96", "--dump-logits", "out/l.bin"]
    return base + args, stdin


def snapshot(top):
    """Every entry under `top`: relative path -> (kind, size, mtime, sha1 of a regular file)."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            digest = None
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    digest = hashlib.sha1(f.read()).hexdigest()
            entries[os.path.relpath(path, top)] = (st.st_mode >> 12, st.st_size, st.st_mtime_ns, digest)
    return entries


def control_in(line):
    """The first raw control character in a stderr line (bytes), or None."""
    text = line.decode("utf-8", "replace")
    for ch in text:
        if ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:
            return ch
    return None


def check(result, before, after, out_dir):
    """The findings of one run: a list of (category, detail)."""
    found = []
    status, err = result["status"], result["stderr"]
    if result["timed_out"]:
        found.append(("hang", "still running after the timeout"))
    elif status < 0:
        found.append(("signal", "killed by %s" % signal.Signals(-status).name))
    if SANITIZER.search(err):
        line = next((l for l in err.split(b"\n") if SANITIZER.search(l) or b"SUMMARY" in l), b"")
        found.append(("sanitizer", line.decode("utf-8", "replace")[:200]))
    if before != after:
        changed = sorted(set(before) ^ set(after) | {k for k in before if k in after and before[k] != after[k]})
        found.append(("model-written", ", ".join(changed)[:200]))
    if not result["timed_out"] and status >= 0 and not found:
        if status not in (0, 1):
            found.append(("status", "exit status %d" % status))
        if status == 1 and b"nvfp4: error: " not in err:
            found.append(("silent-error", "exit 1 without an error line"))
        for line in err.split(b"\n"):
            if line and not line.startswith(b"nvfp4: "):
                found.append(("multi-line", line.decode("utf-8", "replace")[:120]))
                break
            bad = control_in(line)
            if bad:
                found.append(("raw-control", "%r in %s" % (bad, line.decode("utf-8", "replace")[:120])))
                break
        if out_dir and os.path.isdir(out_dir):
            left = sorted(os.listdir(out_dir))
            if left not in ([], ["l.bin"]) or (left == ["l.bin"] and status != 0):
                found.append(("dump-leftover", "%s after exit %d" % (left, status)))
    return found


def run_case(index, args, binary, scratch, findings_dir, lock, stats):
    rng = random.Random("%d/%d" % (args.seed, index))
    seed = rng.choice(SEEDS)
    mode = rng.choice(MODES)
    case = tempfile.mkdtemp(prefix="case-", dir=scratch)
    model = os.path.join(case, "model")
    shutil.copytree(os.path.join(ROOT, seed), model, symlinks=True)
    os.mkdir(os.path.join(case, "out"))
    mutations = [] if rng.random() < 0.04 else [mutate_model(model, rng) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
    argv, stdin = command(mode, binary, "model", case, rng)
    before = snapshot(model)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", ASAN_OPTIONS="detect_leaks=0:exitcode=86:handle_abort=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87")
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True, cwd=case)
    timed_out = False
    try:
        out, err = proc.communicate(stdin, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    result = {"status": proc.returncode, "stderr": err, "timed_out": timed_out, "seconds": time.monotonic() - start}
    after = snapshot(model)
    found = check(result, before, after, os.path.join(case, "out") if mode == "dump" else None)
    message = next((l[14:] for l in err.split(b"\n") if l.startswith(b"nvfp4: error: ")), b"")
    with lock:
        stats["cases"] += 1
        stats["mode", mode] += 1
        stats["status", "timeout" if timed_out else proc.returncode] += 1
        stats["warnings"] += err.count(b"nvfp4: warning: ")
        # the refusal, its paths and numbers masked, so that one kind counts once
        stats["message", re.sub(rb"[0-9]+", b"N", message)[:90].decode("utf-8", "replace")] += 1
        keep = found and stats["kept"] < args.keep
        if keep:
            stats["kept"] += 1
            number = stats["kept"]
        for category, detail in found:
            stats["finding", category] += 1
    if keep:
        dest = os.path.join(findings_dir, "%03d" % number)
        special = lambda p: os.path.exists(p) and not os.path.isfile(p) and not os.path.isdir(p)   # a FIFO would block
        shutil.copytree(case, dest, symlinks=True, ignore_dangling_symlinks=True,
                        ignore=lambda d, names: [n for n in names if special(os.path.join(d, n))])
        with open(os.path.join(dest, "case.json"), "w") as f:
            json.dump({"index": index, "seed_dir": seed, "mode": mode, "mutations": mutations,
                       "repro": "cd %s && %s < stdin" % (os.path.relpath(dest, ROOT), shlex.join(argv)),
                       "status": proc.returncode, "timed_out": timed_out, "findings": found}, f, indent=1)
        for name, data in (("stdin", stdin), ("stdout", out), ("stderr", err)):
            with open(os.path.join(dest, name), "wb") as f:
                f.write(data)
        print("FINDING %03d: %s, %s on %s: %s" % (number, "; ".join("%s (%s)" % f for f in found), mode, seed,
                                                 "; ".join(mutations)), flush=True)
    shutil.rmtree(case, ignore_errors=True)
    return found


def build(out):
    """The sanitizer build of nvfp4, with the Makefile's SANITIZE flags."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        flags = re.search(r"^SANITIZE = (.*)$", f.read(), re.M).group(1).split()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd = [os.environ.get("CC", "cc")] + flags + ["-o", out, os.path.join(ROOT, "nvfp4.c"), "-lm", "-ldl"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--timeout", type=float, default=60, help="seconds before a run counts as a hang")
    ap.add_argument("--binary", help="an nvfp4 built with the sanitizers (default: build it)")
    ap.add_argument("--keep", type=int, default=50, help="findings kept under build/fuzz/findings")
    args = ap.parse_args()
    binary = args.binary or os.path.join(ROOT, "build/fuzz/nvfp4-sanitize")
    if not args.binary:
        build(binary)
    binary = os.path.abspath(binary)
    findings_dir = os.path.join(ROOT, "build/fuzz/findings")
    shutil.rmtree(findings_dir, ignore_errors=True)
    os.makedirs(findings_dir)
    seeds_before = {s: snapshot(os.path.join(ROOT, s)) for s in SEEDS}
    scratch = tempfile.mkdtemp(prefix="nvfp4-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    stats, lock = collections.Counter(), threading.Lock()
    deadline = time.monotonic() + args.minutes * 60
    print("fuzzing for %.1f min with %d jobs, seed %d" % (args.minutes, args.jobs, args.seed), flush=True)
    try:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            running, index = set(), 0
            while time.monotonic() < deadline or running:
                while time.monotonic() < deadline and len(running) < args.jobs:
                    running.add(pool.submit(run_case, index, args, binary, scratch, findings_dir, lock, stats))
                    index += 1
                done, running = concurrent.futures.wait(running, timeout=1, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    try:
                        future.result()
                    except Exception:   # a bug of this script: say so, and go on
                        stats["harness errors"] += 1
                        traceback.print_exc()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for s in SEEDS:
        if snapshot(os.path.join(ROOT, s)) != seeds_before[s]:
            stats["finding", "seed-written"] += 1
            print("FINDING: the seed directory %s changed" % s)
    print("\n%d cases in %.1f min (seed %d)" % (stats["cases"], args.minutes, args.seed))
    print("modes:  " + ", ".join("%s %d" % (k[1], v) for k, v in sorted(stats.items(), key=str) if k[0] == "mode"))
    print("status: " + ", ".join("%s: %d" % (k[1], v) for k, v in sorted(stats.items(), key=str) if k[0] == "status") +
          "; %d warnings" % stats["warnings"])
    messages = sorted(((v, k[1]) for k, v in stats.items() if k[0] == "message" and k[1]), reverse=True)
    print("%d kinds of refusal; the most frequent:" % len(messages))
    for v, m in messages[:15]:
        print("  %5d  %s" % (v, m))
    found = {k[1]: v for k, v in stats.items() if k[0] == "finding"}
    if stats["harness errors"]:
        print("%d cases failed in this script (tracebacks above)" % stats["harness errors"])
    print("findings: " + (", ".join("%s %d" % kv for kv in sorted(found.items())) if found else "none") +
          (" (cases kept under build/fuzz/findings/)" if found else ""))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
