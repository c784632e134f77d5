"""Devices under test: the XDNA 2 emulator, replays of references, trace directories, pyxrt."""
