#!/usr/bin/env python3
"""Print a manifest of a directory tree, one line per entry, sorted: type, path, and
SHA-256 of the contents / symlink target / xattrs, size, mode, hard-link group.
Used by the rekey tests (and by hand) to compare a tree before and after.
Usage: tree-manifest.py DIR [--exclude NAME]"""
import hashlib, os, sys

root = sys.argv[1]
# --exclude NAME: leave out the top-level entry NAME (a directory others write in meanwhile).
exclude = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--exclude" else None
groups = {}
lines = []
for dirpath, dirnames, filenames in os.walk(root):
    if exclude and dirpath == root:
        dirnames[:] = [d for d in dirnames if d != exclude]
        filenames = [f for f in filenames if f != exclude]
    for name in sorted(dirnames + filenames):
        p = os.path.join(dirpath, name)
        rel = os.path.relpath(p, root)
        st = os.lstat(p)
        mode = oct(st.st_mode & 0o7777)
        try:
            xs = sorted((x, os.getxattr(p, x, follow_symlinks=False).hex()) for x in os.listxattr(p, follow_symlinks=False) if x.startswith("user."))
        except OSError:
            xs = []
        if os.path.islink(p):
            lines.append(f"L {rel!r} -> {os.readlink(p)!r}")
            continue
        if os.path.isdir(p):
            lines.append(f"D {rel!r} {mode} {xs}")
            continue
        if not os.path.isfile(p):
            lines.append(f"S {rel!r} {oct(st.st_mode)}")
            continue
        h = hashlib.sha256()
        with open(p, "rb", buffering=0) as f:
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                h.update(b)
        key = (st.st_dev, st.st_ino)
        groups.setdefault(key, []).append(rel)
        lines.append((key, f"F {rel!r} {mode} {st.st_size} {h.hexdigest()} {xs}"))
out = []
for l in lines:
    if isinstance(l, tuple):
        out.append(l[1] + f" link={min(groups[l[0]])!r}")
    else:
        out.append(l)
for l in sorted(out):
    print(l)
