"""
The Kubernetes API relay (``protocol: kubernetes``), built on the HTTP relay.

``_request`` (a request as the API server understands it: verb, group,
version, resource, subresource, namespace, name), ``_secrets`` (Secret data
masked in objects, lists, tables and watch events), ``_exec`` (exec and attach
streams over channel.k8s.io), ``_dialect`` (the HTTP dialect: Status errors,
body plans, stream recording), ``policy``, ``plugin``. See docs/kubernetes.md.
"""
