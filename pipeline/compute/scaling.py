"""The scaling policy of a Ray Train run on a stage's private local Ray.

Ray Train's fixed policy registers the run's resources with Ray Data's
AutoscalingCoordinator, a detached actor it creates on the first call and
waits for (up to 5 s) before the controller starts any worker: one more Python
process importing Ray Train and Ray Data, on the critical path of every run,
for an autoscaler a single local node never uses. A cluster's autoscaler does
use it, so runs on a configured `ray.address` (and sweeps) keep Ray's policy.
"""
from __future__ import annotations

from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy


class LocalScalingPolicy(FixedScalingPolicy):
    """`num_workers` workers, as Ray's fixed policy decides, with no resource requests sent."""

    def after_controller_start(self, train_run_context) -> None:
        self._requester_id = f"train-{train_run_context.run_id}"  # as Ray's; the coordinator is never made

    def _maybe_send_resource_request(self) -> None:
        return None
