"""
The SSH gateway (``protocol: ssh``): unchanged ssh, scp and sftp clients,
terminated with twisted.conch on both sides and relayed channel by channel.

- ``_unwrap.py``: what a command line runs (pure)
- ``policy.py``: facts of operations and the rule keys that match them (pure)
- ``_sftp.py``: the SFTP stream, framed and judged (pure)
- ``_shell.py``: typed command lines rebuilt from input and the echoed screen (pure, pyte)
- ``_masking.py``, ``_recording.py``: masking across chunk boundaries, asciicast events (pure)
- ``_flow.py``: channels with ordered output queues and coupled windows
- ``_hostkeys.py``: the gateway's host key; the upstream key check
- ``_server.py``, ``_client.py``: the client-facing and upstream conch services
- ``_pair.py``: a client channel and its upstream twin; port forwards
- ``_channels.py``: session channels (exec, shell, sftp)
- ``relay.py``: the factory and the per-connection session
- ``plugin.py``: configuration and the plugin object
"""
