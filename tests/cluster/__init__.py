"""A cluster in a box: the rendered Kubernetes manifests, run as Kubernetes would.

Each pod is a network namespace on a bridge with its own IP, its containers processes
chrooted into the exported filesystem of their built image (never the checkout), with
env from ConfigMaps and Secrets, volumes as real files, certificates issued as
cert-manager would, NetworkPolicies as nftables rules, and probes run as kubelet runs
them. One module per concern:

- manifests: `kubectl kustomize`, selectors, replicas;
- rootfs: images exported to directories (docker);
- network: namespaces, the bridge, pod IPs, Service names in /etc/netns/<ns>/hosts;
- certs: cert-manager's Issuers and Certificates, issued by a test CA;
- policy: NetworkPolicies to nftables;
- kubelet: pods (volumes, env, processes, probes, restarts);
- controllers: Deployments and StatefulSets (replicas, rollouts, scaling), Services;
- agent: what runs inside a namespace for the harness (probes, test clients).
"""
