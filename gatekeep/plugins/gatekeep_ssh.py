"""The SSH protocol plugin (``protocol: ssh``)."""

from gatekeep.protocols.ssh.plugin import SshPlugin

ssh = SshPlugin()
