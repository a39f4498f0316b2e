"""Is the shield on? One answer, whatever asks: a worker's log line, `kvshield serve`'s ready line, the enclave's info().

    status = ShieldStatus(mode="mix", layers=30, fingerprint="9b22e610081279f4")
    status.log_line()         # kvshield: shield active: mode=mix, key fingerprint 9b22e610081279f4, 30 layers transformed
    ShieldStatus.from_log_line(line) == status
    status.mismatch("mix", fingerprint=None, layers=30)   # None: it is the shield asked for; else why not

The shield is on when a mode is set and at least one layer went through the enclave.
No status carries key material: the fingerprint is a hash.
"""

import re
from dataclasses import dataclass

LOG_LINE = re.compile(
    r"kvshield: shield active: mode=(?P<mode>[^,\s]+), key fingerprint (?P<fingerprint>[0-9a-f]+), "
    r"(?P<layers>\d+) layers transformed"
)
READY_LINE = re.compile(r"kvshield: ready at (?P<url>\S+) \(mode=(?P<mode>[^,]+), key fingerprint (?P<fingerprint>[0-9a-f]+)\)")


@dataclass(frozen=True)
class ShieldStatus:
    mode: str | None  # None: the shield is off
    layers: int | None  # distinct decoder layers transformed; None where the source does not say (the ready line)
    fingerprint: str | None = None  # the key's fingerprint, where the source says it

    @classmethod
    def off(cls) -> "ShieldStatus":
        return cls(mode=None, layers=0)

    @property
    def enabled(self) -> bool:
        return self.mode is not None and self.layers != 0

    def mismatch(self, mode: str, fingerprint: str | None = None, layers: int | None = None) -> str | None:
        """Why this is not the shield asked for (off, another mode, key fingerprint or layer count), or None."""
        if not self.enabled:
            return "the shield is off"
        if self.mode != mode:
            return f"mode {self.mode!r}, {mode!r} was asked for"
        if fingerprint is not None and self.fingerprint != fingerprint:
            return f"key fingerprint {self.fingerprint}, the key file has {fingerprint}"
        if layers is not None and self.layers != layers:
            return f"{self.layers} layers transformed, the model has {layers}"
        return None

    def log_line(self) -> str:
        """What each worker logs once its layers went through the enclave (`kvshield serve` waits for it)."""
        return f"kvshield: shield active: mode={self.mode}, key fingerprint {self.fingerprint}, {self.layers} layers transformed"

    @classmethod
    def from_log_line(cls, line: str) -> "ShieldStatus | None":
        m = LOG_LINE.search(line)
        return None if m is None else cls(m["mode"], int(m["layers"]), m["fingerprint"])

    def ready_line(self, url: str) -> str:
        """What `kvshield serve` prints once the server is proven ready."""
        return f"kvshield: ready at {url} (mode={self.mode}, key fingerprint {self.fingerprint})"

    @classmethod
    def from_ready_line(cls, line: str) -> "ShieldStatus | None":
        m = READY_LINE.search(line)
        return None if m is None else cls(m["mode"], None, m["fingerprint"])

    @classmethod
    def from_enclave_info(cls, info: dict) -> "ShieldStatus":
        return cls(info["mode"], info["layers_transformed"], info["fingerprint"])
