#!/bin/sh
# DEK rekey, offline and online (through the mount, nothing else using it), against
# cp -a of the same backing data, side by side in one run.
# Usage: scripts/bench-rekey.sh [XTSFS_BINARY] [MiB of large files] [number of small files] [plain|integrity]
set -eu
BIN=${1:-.build/debug/xtsfs}
BIG=${2:-512}
SMALL=${3:-2000}
MODE=${4:-plain}
case "$MODE" in
    plain) INIT_MODE= ;;
    integrity) INIT_MODE=--integrity ;;
    *) echo "usage: $0 [XTSFS_BINARY] [MiB] [files] [plain|integrity]" >&2; exit 2 ;;
esac
W=$(mktemp -d /tmp/xtsfs-bench-rekey.XXXXXX)
trap 'fusermount3 -u -z "$W/mnt" 2>/dev/null || true; rm -rf "$W"' EXIT
echo "bench pass" > "$W/pass"
mkdir "$W/mnt"
"$BIN" init "$W/cipher" --passfile "$W/pass" --pbkdf-memory 8192 --pbkdf-force-iterations 1 $INIT_MODE >/dev/null 2>&1
"$BIN" mount "$W/cipher" "$W/mnt" --passfile "$W/pass" 2>/dev/null
i=0; while [ $i -lt $((BIG / 32)) ]; do head -c 33554432 /dev/urandom > "$W/mnt/big$i"; i=$((i + 1)); done
mkdir "$W/mnt/small"
i=0; while [ $i -lt "$SMALL" ]; do head -c $(( (i % 16 + 1) * 4096 )) /dev/urandom > "$W/mnt/small/f$i"; i=$((i + 1)); done
"$BIN" unmount "$W/mnt"
sync
bytes=$(du -sb "$W/cipher" | cut -f1)
t0=$(date +%s.%N); cp -a "$W/cipher" "$W/copy1"; t1=$(date +%s.%N)
cp_s=$(echo "$t1 - $t0" | bc)
t0=$(date +%s.%N); cp -a "$W/cipher" "$W/copy2"; sync; t1=$(date +%s.%N)
cpsync_s=$(echo "$t1 - $t0" | bc)
rm -rf "$W/copy1" "$W/copy2"; sync
t0=$(date +%s.%N); "$BIN" rekey "$W/cipher" --dek --passfile "$W/pass" >/dev/null 2>&1; t1=$(date +%s.%N)
rk_s=$(echo "$t1 - $t0" | bc)
"$BIN" mount "$W/cipher" "$W/mnt" --passfile "$W/pass" 2>/dev/null
sync
t0=$(date +%s.%N); "$BIN" rekey "$W/cipher" --dek --passfile "$W/pass" >/dev/null 2>&1; t1=$(date +%s.%N)
on_s=$(echo "$t1 - $t0" | bc)
"$BIN" unmount "$W/mnt"
echo "$MODE volume, data: $bytes bytes ($((BIG / 32)) x 32 MiB + $SMALL files of 4-64 KiB)"
printf 'cp -a:          %6.2f s  %7.1f MB/s\n' "$cp_s" "$(echo "$bytes / $cp_s / 1000000" | bc -l)"
printf 'cp -a; sync:    %6.2f s  %7.1f MB/s\n' "$cpsync_s" "$(echo "$bytes / $cpsync_s / 1000000" | bc -l)"
printf 'rekey --dek:    %6.2f s  %7.1f MB/s\n' "$rk_s" "$(echo "$bytes / $rk_s / 1000000" | bc -l)"
printf 'rekey online:   %6.2f s  %7.1f MB/s\n' "$on_s" "$(echo "$bytes / $on_s / 1000000" | bc -l)"
printf 'rekey / cp -a speed: %.2f (cp -a; sync: %.2f)\n' "$(echo "$cp_s / $rk_s" | bc -l)" "$(echo "$cpsync_s / $rk_s" | bc -l)"
printf 'online / cp -a speed: %.2f (cp -a; sync: %.2f)\n' "$(echo "$cp_s / $on_s" | bc -l)" "$(echo "$cpsync_s / $on_s" | bc -l)"
