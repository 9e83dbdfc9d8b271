"""The control-socket protocol, version 2 (docs/protocol.md): one JSON object per SOCK_SEQPACKET
message, file descriptors alongside as SCM_RIGHTS; and the sizes of the binary peer channel a
``forward`` request opens. Shared by the daemon and ``iopfd.client``."""

from __future__ import annotations

import json
import math
import reprlib
import socket
import sys

VERSION = 2
MAX_MESSAGE = 1 << 16
MAX_FDS = 4
# Every reply echoes the request's id: it must leave room in the reply and encode without recursing deep.
MAX_ID = 1 << 12  # bytes, as JSON
MAX_ID_DEPTH = 32  # lists and objects nested

# The peer channel (docs/protocol.md, "The peer channel"): iopfd sends struct iommu_hwpt_pgfault
# records, whole groups per packet, at most the records the peer reads at once; the peer sends struct
# iommu_hwpt_page_response records, any number per packet up to MAX_RESPONSES.
RECORD_SIZE = 40
RESPONSE_SIZE = 8
DEFAULT_READ_RECORDS = 256
MAX_READ_RECORDS = 4096  # 160 KiB packets: within a Unix socket's default send buffer
MAX_RESPONSES = 8192  # per packet from the peer (64 KiB)
EVENT_HEADER_SIZE = 8  # struct iommufd_vevent_header, before each vEVENT's payload on the event channel


class ProtocolError(Exception):
    """An error reply, or a message that breaks the protocol. ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def encode(message: dict) -> bytes:
    data = json.dumps({"v": VERSION, **message}, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError("too-large", f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def decode(data: bytes) -> dict:
    try:
        message = json.loads(data, parse_constant=_not_a_number, parse_float=_finite)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("bad-request", f"not a JSON message: {exc}") from None
    except RecursionError:
        raise ProtocolError("bad-request", "JSON nested too deeply; a message is a flat object") from None
    except ValueError:  # int() refuses numbers longer than Python's limit
        raise ProtocolError("bad-request", f"a JSON number of over {sys.get_int_max_str_digits()} digits") from None
    if not isinstance(message, dict):
        raise ProtocolError("bad-request", "a message is a JSON object")
    version = message.get("v")
    if version != VERSION or isinstance(version, bool):  # true == 1 in Python, not in JSON
        raise ProtocolError("unsupported-version", f'this iopfd speaks version {VERSION}: send "v": {VERSION} '
                                                   f"(got {reprlib.repr(version)})")
    return message


# NaN, Infinity and numbers beyond a double are not JSON, and echoing them (in an id) would send
# something that is not JSON either.
def _not_a_number(text: str) -> float:
    raise ProtocolError("bad-request", f"not a JSON message: {text} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ProtocolError("bad-request", f"the JSON number {text[:40]} is beyond a double")
    return value


def send(sock: socket.socket, message: dict, fds: list[int] | tuple[int, ...] = ()) -> None:
    data = encode(message)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def receive(sock: socket.socket) -> tuple[dict, list[int]] | None:
    """One message and the fds that came with it (the caller's to close); None when the peer has
    closed the connection. A message that breaks the protocol raises, its fds closed here."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE + 1, MAX_FDS)
    if not data and not fds:
        return None
    try:
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("too-many-fds", f"at most {MAX_FDS} file descriptors per message")
        if flags & socket.MSG_TRUNC or len(data) > MAX_MESSAGE:
            raise ProtocolError("too-large", f"a message is at most {MAX_MESSAGE} bytes")
        return decode(data), fds
    except ProtocolError:
        for fd in fds:
            socket.close(fd)
        raise
