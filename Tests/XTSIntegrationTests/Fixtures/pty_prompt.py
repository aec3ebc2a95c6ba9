#!/usr/bin/env python3
"""Drives `xtsfs` on a pseudo-terminal, as a person at a keyboard would.

usage: pty_prompt.py MODE XTSFS ARGS...
  MODE "answer:P1,P2,...": answer each passphrase prompt in turn
  MODE "interrupt": press Ctrl-C at the first prompt
Prints a JSON object: exit status (or -signal), everything the terminal showed, and
whether echo was on after the program ended.
"""
import json, os, pty, select, sys, termios, time

mode, argv = sys.argv[1], sys.argv[2:]
answers = mode.split(":", 1)[1].split(",") if mode.startswith("answer:") else []
pid, fd = pty.fork()
if pid == 0:
    os.execv(argv[0], argv)

shown = b""
reaped = False
status = 0
deadline = time.time() + 60
prompts_seen = 0
while time.time() < deadline:
    r, _, _ = select.select([fd], [], [], 0.1)
    if r:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    if shown.count(b"passphrase: ") + shown.count(b"Passphrase: ") > prompts_seen:
        prompts_seen += 1
        time.sleep(0.05)  # the prompt is written just after echo is turned off
        if mode == "interrupt":
            os.write(fd, b"\x03")
        elif answers:
            os.write(fd, answers.pop(0).encode() + b"\r")
    done, st = os.waitpid(pid, os.WNOHANG)
    if done:
        reaped, status = True, st
        try:
            while True:
                r, _, _ = select.select([fd], [], [], 0.2)
                if not r:
                    break
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                shown += chunk
        except OSError:
            pass
        break
else:
    os.kill(pid, 9)
if not reaped:
    _, status = os.waitpid(pid, 0)

echo_on = bool(termios.tcgetattr(fd)[3] & termios.ECHO)
code = os.waitstatus_to_exitcode(status)
print(json.dumps({"status": code, "shown": shown.decode("utf-8", "replace"), "echo": echo_on}))
