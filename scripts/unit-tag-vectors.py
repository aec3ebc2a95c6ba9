#!/usr/bin/env python3
"""Known answers for the unit tags of integrity volumes (docs/FORMAT.md 12.4), computed
independently of xtsfs: GHASH from its definition (NIST SP 800-38D, section 6.4), AES and
HKDF from Python's `cryptography` package. Prints the values pasted into
Tests/XTSContentTests/UnitTagVectorTests.swift.

    python3 scripts/unit-tag-vectors.py
"""
import hashlib, hmac, struct
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

def hkdf(key, salt, info, n):
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=salt or None, info=info).derive(key)

def aes(key, block):
    e = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return e.update(block) + e.finalize()

def gf_mult(x, y):
    # GF(2^128) with GCM's bit order: bit 0 is the most significant bit of byte 0.
    R = 0xE1 << 120
    z, v = 0, y
    for i in range(127, -1, -1):
        if (x >> i) & 1:
            z ^= v
        v = (v >> 1) ^ R if v & 1 else v >> 1
    return z

def ghash(h, aad):
    # GCM with an empty ciphertext: blocks of A zero-padded, then len(A) || len(C) in bits.
    data = aad + b"\0" * (-len(aad) % 16) + struct.pack(">QQ", len(aad) * 8, 0)
    H, y = int.from_bytes(h, "big"), 0
    for i in range(0, len(data), 16):
        y = gf_mult(y ^ int.from_bytes(data[i:i + 16], "big"), H)
    return y.to_bytes(16, "big")

def tag_v2(key64, unit, ciphertext):
    k1, k2 = key64[:32], key64[32:]
    msg = struct.pack("<Q", unit) + (b"\x01" + ciphertext if ciphertext is not None else b"\x00")
    iv = b"\0" * 12
    s = bytes(a ^ b for a, b in zip(ghash(aes(k1, b"\0" * 16), msg), aes(k1, iv + b"\0\0\0\1")))
    # The same S from a real GCM implementation: the tag of an empty plaintext.
    assert AESGCM(k1).encrypt(iv, b"", msg) == s
    return aes(k2, s)

def tag_v1(key32, unit, ciphertext):
    msg = struct.pack("<Q", unit) + (b"\x01" + ciphertext if ciphertext is not None else b"\x00")
    return hmac.new(key32, msg, hashlib.sha256).digest()[:16]

# Sanity check of ghash() against the GCM spec's test case 2 (AES-128, zero key, one zero block).
h = aes(b"\0" * 16, b"\0" * 16)
assert h.hex() == "66e94bd4ef8a2c3b884cfa59ca342b2e"

dek = bytes(range(64))
volume_id = bytes(range(0xA0, 0xB0))
nonce = bytes(range(0x30, 0x40))
content = hkdf(dek, volume_id, b"xtsfs v1 content", 64)
key_v2 = hkdf(content, b"", b"xtsfs integrity unit tag v2 ghash-aes256" + nonce, 64)
key_v1 = hkdf(content, b"", b"xtsfs integrity unit tag" + nonce, 32)
ct = bytes((i * 7 + 3) & 0xFF for i in range(4096))
print("content key", content.hex())
print("v2 tag key ", key_v2.hex())
for unit, c in [(0, None), (5, ct), (2**40 + 3, ct)]:
    print(f"unit {unit} {'data' if c else 'hole'}: v2 {tag_v2(key_v2, unit, c).hex()} v1 {tag_v1(key_v1, unit, c).hex()}")
