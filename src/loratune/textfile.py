"""Text files as editors and spreadsheet programs save them: UTF-8 with or without a byte-order mark, with
LF or CRLF line ends, reads as the same text; a UTF-16 or UTF-32 file (Excel's "Unicode Text", Notepad's
"Unicode") or one that is not UTF-8 at all is one error line with where it stops being UTF-8 and to save
it as UTF-8. Every file loratune reads as text (data files, YAML configs) comes through here."""

from __future__ import annotations

import codecs
from pathlib import Path

from .errors import LoratuneError

# longest first: UTF-32-LE's mark begins with UTF-16-LE's
OTHER_UNICODE = [(codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                 (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")]


class NotUTF8(ValueError):
    """Bytes that are not UTF-8 text; the message says what they are instead, and to save as UTF-8."""


def decode(data: bytes, hint: str = "") -> str:
    """UTF-8 bytes as text, without the byte-order mark some programs put first; line ends as written
    (every parser loratune uses reads CRLF as LF). Raises NotUTF8 ``"UTF-16 text, not UTF-8; save it as
    UTF-8{hint}"``, ``"not a text file (...)"`` (NUL bytes), or ``"not UTF-8 text (line 3, byte 41: 0xe8);
    save it as UTF-8{hint}"`` (byte offsets from 0, lines from 1)."""
    encoding = next((name for mark, name in OTHER_UNICODE if data.startswith(mark)), None)
    if encoding:
        raise NotUTF8(f"{encoding} text, not UTF-8; save it as UTF-8{hint}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if _looks_binary(data):
            raise NotUTF8(f"not a text file (binary, or UTF-16 without a byte-order mark); save it as UTF-8{hint}") \
                from None
        line = data.count(b"\n", 0, exc.start) + 1
        raise NotUTF8(f"not UTF-8 text (line {line}, byte {exc.start}: 0x{data[exc.start]:02x}); "
                      f"save it as UTF-8{hint}") from None


def _looks_binary(data: bytes) -> bool:
    """NUL bytes (which no text but UTF-16/32 holds), or more than a tenth of the first 4 KB neither valid
    UTF-8 nor printable: not a text file in some other 8-bit encoding (Latin-1, Windows-1252), whose few
    accented letters are worth pointing at by line."""
    head = data[:4096]
    if b"\0" in head:
        return True
    text = head.decode("utf-8", errors="replace")
    bad = sum(c == "\ufffd" or (c < " " and c not in "\t\n\r\f") for c in text)
    return bad > len(text) / 10


def read_text(path: str | Path, where: str, hint: str = "") -> str:
    """A text file's text (see ``decode``). Raises LoratuneError ``"{where}: {problem}"`` for a file that
    is not UTF-8; OSError when it cannot be read."""
    try:
        return decode(Path(path).read_bytes(), hint)
    except NotUTF8 as exc:
        raise LoratuneError(f"{where}: {exc}") from None


def check_start(path: str | Path, where: str, hint: str = "") -> None:
    """Refuse a file marked as UTF-16 or UTF-32 from its first 4 bytes alone, before a library that
    reads the file itself fails on it with a message about something else. Raises LoratuneError
    ``"{where}: UTF-16 text, not UTF-8; ..."``; OSError when the file cannot be opened."""
    with open(path, "rb") as f:
        head = f.read(4)
    if any(head.startswith(mark) for mark, _ in OTHER_UNICODE):
        try:
            decode(head, hint)  # raises, in the same words as every other reader
        except NotUTF8 as exc:
            raise LoratuneError(f"{where}: {exc}") from None
