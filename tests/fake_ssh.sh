#!/usr/bin/env bash
# A stand-in for ssh in the runner tests: ignores the options and the destination and runs the remote
# command with bash on this machine, so the SSH runner's quoting, tar streams and clean-up are exercised
# without a server (the emulated-Pi test uses the real ssh).
for last; do :; done
exec bash -c "$last"
