"""Coverage-guided fuzz target for the keys-file parser (agent.ipsec.keys), on atheris.

    .venv/bin/python fuzz/fuzz_keys.py -runs=100000            # N inputs, then exit 0
    .venv/bin/python fuzz/fuzz_keys.py -max_total_time=600 DIR  # 10 minutes, corpus in DIR

Arguments are libFuzzer's (-runs, -seed, -max_total_time, corpus dirs...).
Without a corpus directory the run starts from built-in seeds (valid files
of both forms) in a temporary directory. A finding is written to
``crash-<sha1>`` in the current directory and the process exits non-zero.

Oracle, for any input bytes:
- parse() returns a KeySet or raises ConfigError, nothing else;
- a ConfigError message contains no 8-character run of any hex-looking
  field of the input (no key material, not even a fragment);
- a KeySet survives format -> parse unchanged, and its current key is its
  last line.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from agent.ipsec import keys
    from agent.errors import ConfigError

_HEXLIKE = re.compile(r"(0x)?[0-9a-fA-F]{8,}")

SEEDS = [
    "3+ rfc4106(gcm(aes)) 0x41049390e1e2b5d6543901daab6435f4042155fe 128\n",
    "3+ rfc4106(gcm(aes)) 41049390e1e2b5d6543901daab6435f4042155fe 128\n"
    "4+ rfc4106(gcm(aes)) 0x" + "ab" * 36 + " 128\n",
    "1 hmac(sha256) " + "01" * 32 + " cbc(aes) " + "02" * 16 + "\r\n\n2 hmac(sha256) 0x" + "03" * 32 + " cbc(aes) " + "04" * 32,
    "15 rfc7539esp(chacha20,poly1305) " + "0f" * 36 + " 128",
]


def check(text: str) -> None:
    """Raise AssertionError if the parser breaks the oracle on ``text``."""
    try:
        ks = keys.parse(text)
    except ConfigError as e:
        message = str(e)
        fields = text.split()
        echoable = [f for f in fields if not _HEXLIKE.fullmatch(f)]
        for field in fields:
            if not _HEXLIKE.fullmatch(field):
                continue
            for i in range(len(field) - 7):
                window = field[i : i + 8]
                if window in message and not any(window in other for other in echoable):
                    raise AssertionError("ConfigError message carries part of a key field") from None
        return
    assert keys.parse(keys.format_keys(ks)) == ks, "format -> parse changed the keys"
    assert ks.current == ks.keys[-1]


def test_one_input(data: bytes) -> None:
    check(data.decode("utf-8", errors="replace"))


def main(argv: list[str]) -> None:
    if not any(not a.startswith("-") for a in argv[1:]):
        seed_dir = tempfile.mkdtemp(prefix="sealnet-fuzz-keys-")
        for i, seed in enumerate(SEEDS):
            Path(seed_dir, f"seed-{i}").write_text(seed)
        argv = [*argv, seed_dir]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
