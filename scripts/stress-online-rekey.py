#!/usr/bin/env python3
"""Stress an online DEK rekey: random renames (of files and of whole directories),
unlinks, creations, hard links, appends and verified reads on a mounted volume while
`xtsfs rekey --dek` sweeps it, against an in-memory model of the tree; then the whole
tree is checked against the model, again after a remount.
Usage: stress-online-rekey.py XTSFS_BINARY [SEED]   (makes and removes its own volume)"""
import os, random, shutil, subprocess, sys, tempfile

B = sys.argv[1]
random.seed(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
W = tempfile.mkdtemp(prefix="xtsfs-stress-")
C, M, PW = W + "/cipher", W + "/mnt", W + "/pass"
os.mkdir(M)
open(PW, "w").write("stress\n")
subprocess.run([B, "init", C, "--passfile", PW, "--pbkdf-memory", "8192", "--pbkdf-force-iterations", "1"], check=True, capture_output=True)
subprocess.run([B, "mount", C, M, "--passfile", PW], check=True, capture_output=True)
bad = 0
try:
    def content(tag):
        return (tag * 9000)[: 1000 + random.randrange(50000)].encode()
    model = {}
    for d in range(20):
        os.mkdir(f"{M}/d{d}")
        for f in range(25):
            p = f"d{d}/f{f}"
            model[p] = content(p)
            open(f"{M}/{p}", "wb").write(model[p])
    rekey = subprocess.Popen([B, "rekey", C, "--dek", "--passfile", PW], stderr=subprocess.PIPE)
    ops, errors = 0, []
    while rekey.poll() is None or ops < 200:
        ops += 1
        op, files = random.random(), list(model)
        try:
            if op < 0.25:
                src, dst = random.choice(files), f"d{random.randrange(20)}/r{ops}"
                os.rename(f"{M}/{src}", f"{M}/{dst}")
                model[dst] = model.pop(src)
            elif op < 0.35:
                a, b = random.sample(range(20), 2)
                os.rename(f"{M}/d{a}", f"{M}/swap"); os.rename(f"{M}/d{b}", f"{M}/d{a}"); os.rename(f"{M}/swap", f"{M}/d{b}")
                swap = {f"d{a}": f"d{b}", f"d{b}": f"d{a}"}
                model = {swap.get(k.split("/")[0], k.split("/")[0]) + "/" + k.split("/", 1)[1]: v for k, v in model.items()}
            elif op < 0.45:
                src = random.choice(files)
                os.unlink(f"{M}/{src}")
                del model[src]
            elif op < 0.6:
                p = f"d{random.randrange(20)}/n{ops}"
                model[p] = content(p)
                open(f"{M}/{p}", "wb").write(model[p])
            elif op < 0.7:
                src, dst = random.choice(files), f"d{random.randrange(20)}/h{ops}"
                os.link(f"{M}/{src}", f"{M}/{dst}")
                model[dst] = model[src]
            elif op < 0.8:
                src = random.choice(files)
                with open(f"{M}/{src}", "ab") as fh:
                    fh.write(b"+%d" % ops)
                ino = os.stat(f"{M}/{src}").st_ino
                for k in model:
                    if os.stat(f"{M}/{k}").st_ino == ino:
                        model[k] += b"+%d" % ops
            else:
                src = random.choice(files)
                if open(f"{M}/{src}", "rb").read() != model[src]:
                    errors.append(f"read mismatch {src} (op {ops})")
        except Exception as e:
            errors.append(f"op {ops}: {e!r}")
    err = rekey.stderr.read().decode().strip().splitlines()
    print("rekey exit", rekey.returncode, err[-2:-1])
    print("operations", ops, "errors during the rekey:", errors[:10])
    bad += len(errors) + (rekey.returncode != 0)

    def check(when):
        n = 0
        for k, v in model.items():
            try:
                if open(f"{M}/{k}", "rb").read() != v:
                    n += 1; print(when, "contents differ:", k)
            except OSError as e:
                n += 1; print(when, k, e)
        listed = {f"d{d}/{f}" for d in range(20) for f in os.listdir(f"{M}/d{d}")}
        if listed != set(model):
            n += 1; print(when, "names differ:", sorted(listed ^ set(model))[:10])
        print(when, len(model), "files,", n, "problems")
        return n
    bad += check("after the rekey:")
    subprocess.run([B, "unmount", M], check=True)
    subprocess.run([B, "mount", C, M, "--passfile", PW], check=True, capture_output=True)
    bad += check("after a remount:")
finally:
    subprocess.run([B, "unmount", M], capture_output=True)
    shutil.rmtree(W, ignore_errors=True)
sys.exit(1 if bad else 0)
