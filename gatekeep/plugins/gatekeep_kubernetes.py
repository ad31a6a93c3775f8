"""The Kubernetes API protocol plugin (``protocol: kubernetes``)."""

from gatekeep.protocols.kubernetes.plugin import KubernetesPlugin

kubernetes = KubernetesPlugin()
