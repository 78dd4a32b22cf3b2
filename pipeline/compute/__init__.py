"""Ray: the cluster a stage runs on and the Ray Train runs it starts.

`cluster` (connect to a cluster or start a private local one), `local` (that
private Ray: loopback only, token, its own temp dir),
`trainer` (the Ray Train run of a stage: seeds, resume, checkpoint pruning),
`scaling` (its scaling policy on a private Ray: no autoscaler to ask),
`rendezvous` (torch's rendezvous store on loopback) and `renice` (the local
Ray daemons' CPU priority).
"""
