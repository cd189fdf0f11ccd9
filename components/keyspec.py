"""KeySpec: refuse a change of key size, algorithm or ICV length on a deployed stack.

Why nothing of the key spec may change in place:

- ``sealnet:keyBits`` sets the length of both ``random.RandomBytes`` slots, so
  a change replaces both at once: the key in use leaves the keys Secret, and
  key IDs the nodes already hold get new keys (unless ``rotation`` also moves
  by two, which still drops the key in use). Cilium's agent refuses a reload
  whose key ID is the one it holds ("changing IPSec keys requires
  incrementing the key id"), so in mode ``cilium`` a key changed under the
  same key ID would be ignored until the agent restarts;
  sealnet's agent refuses it too. Nodes would disagree about the keys and
  traffic would drop.
- The ICV length (and, for the non-AEAD form, the algorithm's auth key)
  sets the ESP overhead: Cilium's agent refuses a rotation that changes it
  ("key length must not change", cilium/cilium#37936) and sealnet's agent
  does the same. The AES key size alone does not change the overhead (ESP
  header, IV and ICV are the same for AES-128 and AES-256 GCM), which is why
  keyBits is refused for the reason above, not for this one.

Mechanism: a dynamic resource holding ``keyBits``, ``algorithm`` and
``icvBits``, whose provider's ``check`` compares the new inputs with the
inputs the stack last deployed (the engine passes them as ``olds``) and fails
with a message naming the setting, both values and what to do instead:

- ``check`` runs in ``pulumi preview`` as in ``pulumi up``, before any step,
  so the PR's preview shows the refusal; the key slots ``depends_on`` this
  resource, so the engine does not register them (let alone replace them)
  until its step has succeeded;
- on a first deployment there are no olds and any valid key size is taken;
  a stack deployed before this guard existed has no KeySpec yet, so its
  first run with the guard is a first deployment for it (see the README);
- the state it compares with is the stack's own, with no self-reference by
  stack name and no invisible rule in ``keepers`` (keepers only replace,
  they cannot refuse);
- its inputs are not secret and hold no key material, so neither its state
  nor its messages can leak a key.

``diff`` compares the three fields only: the ``__provider`` input (this
class, pickled by dill) can change bytes with another Python or dill version
while nothing changed, and a preview of an unchanged stack must show no diff.

The mock engine never calls a provider's ``check``: the refusal is tested on
:func:`refusal` and through the real dynamic-provider process
(``python -m pulumi.dynamic``), and the mock engine tests the wiring.

The Pulumi SDK pickles the provider by reference (``components.keyspec.
KeySpecProvider``), so the dynamic-provider process imports this module from
the project directory, as with any Python dynamic provider kept in its own
module (pulumi/examples ``aws-py-dynamicresource``). Keep it free of other
sealnet imports and of import-time side effects.

Usage::

    guard = KeySpec(f"{name}-key-spec", KeySpecArgs(key_bits=256,
                    algorithm="rfc4106(gcm(aes))", icv_bits=128), child_opts)
    random.RandomBytes(..., opts=ResourceOptions(parent=self, depends_on=[guard]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Optional

import pulumi
import pulumi.dynamic as dynamic

_REPLACES_BOTH_SLOTS = (
    "The key length is an input of both key slots, so a change replaces both at once: the key in use leaves the "
    "keys Secret, and key IDs the nodes already hold can get new keys, which Cilium's agent refuses (it ignores "
    "the Secret until it restarts) and so does sealnet's agent; traffic between nodes would drop."
)
_CHANGES_THE_SAS = (
    "The algorithm and the ICV length define the SAs of every key ID and the ESP overhead: Cilium's agent refuses "
    "a key rotation that changes the overhead (\"key length must not change\", cilium/cilium#37936), and sealnet's "
    "agent refuses that and a key ID whose key changed."
)


class _Field(NamedTuple):
    what: str
    #: The stack setting that sets the field; None when sealnet itself does.
    setting: Optional[str]
    why: str


#: The KeySpec's inputs, in the order they are checked.
FIELDS: dict[str, _Field] = {
    "keyBits": _Field("the AES key size", "sealnet:keyBits", _REPLACES_BOTH_SLOTS),
    "algorithm": _Field("the keys entry's algorithm", None, _CHANGES_THE_SAS),
    "icvBits": _Field("the keys entry's ICV length", None, _CHANGES_THE_SAS),
}


def _shown(value: Any) -> str:
    """A value as written in config (the wire format carries every number as a float)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def refusal(olds: Mapping[str, Any], news: Mapping[str, Any]) -> Optional[tuple[str, str]]:
    """(input name, message) for the first field ``news`` changes from ``olds``, else None.

    ``olds`` are the inputs of the last deployment, empty on the first one. A
    field missing from ``olds`` (state written before the field existed) is
    not known and not refused. Messages hold setting names and the fields'
    values only.
    """
    for name, field in FIELDS.items():
        if olds.get(name) is None:
            continue
        old, new = _shown(olds[name]), _shown(news.get(name))
        if old == new:
            continue
        if field.setting is not None:
            setting = field.setting
            return name, (
                f"{setting} cannot change on a deployed stack ({field.what}, fixed for the life of the stack): "
                f"the stack was deployed with {setting} {old}, the new value is {new}; allowed: {old}. "
                f"{field.why} Instead, keep {setting} {old} on this stack (`pulumi config set {setting} {old}`); "
                f"to use {new}, deploy a new stack with {setting} {new} from its first `pulumi up` "
                "(on a new cluster, or on this one after `pulumi destroy` of this stack)."
            )
        return name, (
            f"{field.what} ({name}, set by sealnet, not a setting) cannot change on a deployed stack: "
            f"the stack was deployed with {old}, this version of the program sets {new}; allowed: {old}. "
            f"{field.why} Instead, deploy this stack with the sealnet version it was deployed with; "
            f"to use {new}, deploy a new stack from its first `pulumi up`."
        )
    return None


class KeySpecProvider(dynamic.ResourceProvider):
    """The guard's provider: check refuses a changed key spec; CRUD stores the inputs."""

    # The instance has no state, so nothing secret is captured when it is pickled.
    serialize_as_secret_always = False

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> dynamic.CheckResult:
        found = refusal(olds or {}, news)
        failures = [dynamic.CheckFailure(found[0], found[1])] if found else []
        return dynamic.CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> dynamic.DiffResult:
        # The fields only: `__provider` may change bytes with nothing changed.
        changed = any(_shown(olds.get(name)) != _shown(news.get(name)) for name in FIELDS)
        return dynamic.DiffResult(changes=changed, replaces=[], delete_before_replace=False)

    def create(self, props: dict[str, Any]) -> dynamic.CreateResult:
        return dynamic.CreateResult("key-spec", {name: props.get(name) for name in FIELDS})

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> dynamic.UpdateResult:
        return dynamic.UpdateResult({name: news.get(name) for name in FIELDS})


@dataclass(frozen=True)
class KeySpecArgs:
    """Inputs of a :class:`KeySpec`.

    :param key_bits: AES key size, 128 or 256 (``sealnet:keyBits``).
    :param algorithm: the keys entry's AEAD algorithm.
    :param icv_bits: the keys entry's ICV length.
    """

    key_bits: int
    algorithm: str
    icv_bits: int


class KeySpec(dynamic.Resource, module="sealnet", name="KeySpec"):
    """The key spec the stack deployed; changing it fails ``preview`` and ``up``."""

    keyBits: pulumi.Output[int]
    algorithm: pulumi.Output[str]
    icvBits: pulumi.Output[int]

    def __init__(self, name: str, args: KeySpecArgs, opts: Optional[pulumi.ResourceOptions] = None) -> None:
        super().__init__(
            KeySpecProvider(),
            name,
            {"keyBits": args.key_bits, "algorithm": args.algorithm, "icvBits": args.icv_bits},
            opts,
        )
