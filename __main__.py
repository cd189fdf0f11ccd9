"""sealnet: transparent encryption of Kubernetes traffic, as one Pulumi stack.

Reads the typed `sealnet:` config (validated before anything is declared),
builds one TransparentEncryption on a Kubernetes provider for the stack's
`kubernetes:context`, and exports what operators look at after `pulumi up`.
"""

import pulumi
import pulumi_kubernetes as k8s

from components import config
from components.encryption import TransparentEncryption, TransparentEncryptionArgs

settings = config.load()

kube = pulumi.Config("kubernetes")
provider = k8s.Provider(
    "k8s",
    context=kube.get("context"),
    kubeconfig=kube.get("kubeconfig"),
    # A key rotation updates the keys Secret in place instead of replacing it.
    enable_secret_mutable=True,
)

encryption = TransparentEncryption(
    "sealnet",
    TransparentEncryptionArgs(settings),
    pulumi.ResourceOptions(providers={"kubernetes": provider}),
)

pulumi.export("mode", encryption.mode)
pulumi.export("rotation", encryption.rotation)
pulumi.export("keyId", encryption.key_id)
pulumi.export("secretName", encryption.secret_name)
pulumi.export("daemonSetName", encryption.daemon_set_name)
