"""Automations of the dpo-eval deployments.

Flow retries do not cover a crashed process (a reclaimed spot GPU): this automation puts a crashed
flow run of a deployment back to Scheduled, so a worker picks it up and the persisted task results
make it resume where it stopped. The cap lives in the flow: evaluate_checkpoint fails (not crashes)
once it has been started more than `EvalConfig.max_restarts + 1` times, which ends the loop.

    python deployments/automations.py evaluate-checkpoint/gpu
"""

from __future__ import annotations

import sys

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture


def crash_restart_automation(deployment_id: str, name: str) -> Automation:
    """Reschedule any crashed flow run of the deployment `deployment_id`."""
    return Automation(
        name=f"restart crashed runs of {name}",
        description="Reschedule a crashed (preempted) flow run; the flow caps the number of restarts.",
        trigger=EventTrigger(expect={"prefect.flow-run.Crashed"},
                             match_related={"prefect.resource.id": f"prefect.deployment.{deployment_id}"},
                             posture=Posture.Reactive, threshold=1),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED,
                                    message="rescheduled after a crash (preempted worker)")],
    )


def main(deployment_name: str) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name)
    automation = crash_restart_automation(str(deployment.id), deployment_name).create()
    print(f"created automation {automation.id}: {automation.name}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "evaluate-checkpoint/gpu")
