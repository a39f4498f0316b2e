"""The shield's one configuration, parsed from vLLM's `additional_config["kvshield"]`.

    --additional-config '{"kvshield": {"mode": "mix", "key_file": "/etc/kvshield.key"}}'
"""

from dataclasses import dataclass, fields

from .transforms import MODES

CONFIG_KEY = "kvshield"
DEFAULT_MODE = "mix"


class ShieldConfigError(ValueError):
    """The kvshield configuration is invalid: the shield refuses to start."""


class ShieldError(RuntimeError):
    """The shield was asked for but cannot be guaranteed: refuse to serve."""


@dataclass(frozen=True)
class ShieldConfig:
    mode: str = DEFAULT_MODE
    key_file: str | None = None  # None: a fresh random key per start
    ray_address: str | None = None  # None: join the local Ray, or start one
    enclave_resources: dict[str, float] | None = None  # Ray custom resources that pin the enclave actor

    def __post_init__(self):
        if self.mode not in MODES:
            raise ShieldConfigError(f"kvshield: unknown mode {self.mode!r}; accepted modes: {', '.join(MODES)}")
        for name in ("key_file", "ray_address"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ShieldConfigError(f"kvshield: {name} must be a non-empty string, got {value!r}")
        res = self.enclave_resources
        if res is not None and not (
            isinstance(res, dict)
            and all(isinstance(k, str) and isinstance(v, (int, float)) and v > 0 for k, v in res.items())
        ):
            raise ShieldConfigError(
                f"kvshield: enclave_resources must map resource names to positive numbers, got {res!r}"
            )

    @classmethod
    def from_dict(cls, raw) -> "ShieldConfig":
        if not isinstance(raw, dict):
            raise ShieldConfigError(f"kvshield: config must be a JSON object, got {raw!r}")
        accepted = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(accepted))
        if unknown:
            raise ShieldConfigError(f"kvshield: unknown config key(s) {', '.join(unknown)}; accepted keys: {', '.join(accepted)}")
        return cls(**raw)

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "ShieldConfig | None":
        """The shield config of a VllmConfig, or None when the shield is not asked for."""
        extra = vllm_config.additional_config
        if not isinstance(extra, dict) or CONFIG_KEY not in extra:
            return None
        return cls.from_dict(extra[CONFIG_KEY])
