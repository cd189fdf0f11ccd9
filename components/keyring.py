"""Keyring: two RandomBytes key slots and the Cilium-format keys Secret.

Children (parented to the component):

- ``<name>-key-spec``: a :class:`components.keyspec.KeySpec` holding the key
  size, algorithm and ICV length; its provider's check fails ``preview`` and
  ``up`` when they differ from what the stack deployed (see that module for
  why a key size cannot change in place). The slots depend on it, so the
  engine touches no key before the check has passed.
- ``<name>-slot0``, ``<name>-slot1``: ``random.RandomBytes`` with the key
  material (AES key + 4-byte salt). Their ``keepers`` come from
  :func:`components.rotation.slot_keepers`, so rotation N -> N+1 replaces
  exactly one slot and the previous key stays byte-identical.
- ``<name>-secret``: the Secret whose single entry ``keys`` holds the previous
  line (if any) and then the current one; for Cilium's agent the current
  line alone (``include_previous=False``, see :mod:`components.rotation`). With the provider's
  ``enableSecretMutable`` a rotation updates it in place; the kubelet then
  refreshes the mounted file and the agents (or Cilium) reload it.

All key material stays inside secret Outputs: the slots' ``hex``, the keys
text, the Secret's ``data``. The component's registered outputs carry none.

Usage::

    keyring = Keyring("sealnet-keys", KeyringArgs(
        rotation=settings.rotation_config,
        secret_name="sealnet-ipsec-keys", namespace="kube-system"), opts)
    keyring.key_id        # Output[int], plain
    keyring.keys          # Output[str], secret
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Optional

import pulumi
import pulumi_kubernetes as k8s
import pulumi_random as random

from components import render
from components.keyspec import KeySpec, KeySpecArgs
from components.rotation import AEAD_ALGORITHM, ICV_BITS, SLOTS, RotationConfig, keys_entry, slot_keepers


@dataclass(frozen=True)
class KeyringArgs:
    """Inputs of a :class:`Keyring`.

    :param rotation: the validated key schedule (rotation, key size, per-node keys).
    :param secret_name: name of the keys Secret (Cilium's: ``cilium-ipsec-keys``).
    :param namespace: namespace of the keys Secret.
    :param include_previous: write the previous key's line before the current
        one (sealnet's agent); False for Cilium's agent, which refuses a
        reload whose first line is the key it holds.
    """

    rotation: RotationConfig
    secret_name: str
    namespace: str
    include_previous: bool = True


class Keyring(pulumi.ComponentResource):
    """The IPsec keys: two double-buffered slots and the ``keys`` Secret."""

    key_id: pulumi.Output[int]
    rotation: pulumi.Output[int]
    secret_name: pulumi.Output[str]
    #: The keys entry text; secret.
    keys: pulumi.Output[str]
    #: The guard that refuses a changed key size, algorithm or ICV length.
    key_spec: KeySpec
    slots: tuple[random.RandomBytes, ...]
    secret: k8s.core.v1.Secret

    def __init__(self, name: str, args: KeyringArgs, opts: Optional[pulumi.ResourceOptions] = None) -> None:
        super().__init__("sealnet:index:Keyring", name, None, opts)
        child_opts = pulumi.ResourceOptions(parent=self)
        schedule = args.rotation

        self.key_spec = KeySpec(
            f"{name}-key-spec", KeySpecArgs(schedule.key_bits, AEAD_ALGORITHM, ICV_BITS), child_opts
        )
        # A changed key length would replace both slots (length is a
        # RandomBytes input); the key spec's check refuses it first.
        slot_opts = pulumi.ResourceOptions.merge(child_opts, pulumi.ResourceOptions(depends_on=[self.key_spec]))
        self.slots = tuple(
            random.RandomBytes(
                f"{name}-slot{slot}",
                length=schedule.key_length,
                keepers=slot_keepers(schedule.rotation, slot),
                opts=slot_opts,
            )
            for slot in range(SLOTS)
        )
        # pulumi-random marks `hex` secret in the engine; wrap it anyway so the
        # guarantee does not depend on the provider (the mock engine, for one).
        slot_hex = [pulumi.Output.secret(slot.hex) for slot in self.slots]
        self.keys = pulumi.Output.secret(
            pulumi.Output.all(*slot_hex).apply(
                lambda hexes: keys_entry(schedule, dict(enumerate(hexes)), args.include_previous)
            )
        )
        data = self.keys.apply(lambda text: {render.KEYS_ENTRY: base64.b64encode(text.encode()).decode()})
        self.secret = k8s.core.v1.Secret(
            f"{name}-secret",
            metadata=render.secret_metadata(args.secret_name, args.namespace),
            type="Opaque",
            data=pulumi.Output.secret(data),
            opts=child_opts,
        )

        self.key_id = pulumi.Output.from_input(schedule.key_id)
        self.rotation = pulumi.Output.from_input(schedule.rotation)
        self.secret_name = pulumi.Output.from_input(args.secret_name)
        previous = schedule.previous_key_id
        pulumi.log.info(
            f"rotation {schedule.rotation}: key ID {schedule.key_id} in slot {schedule.current_slot}"
            + (f", previous key ID {previous} kept" if previous is not None else ", no previous key"),
            resource=self,
        )
        self.register_outputs(
            {
                "keyId": self.key_id,
                "rotation": self.rotation,
                "secretName": self.secret_name,
                "secretNamespace": args.namespace,
            }
        )
