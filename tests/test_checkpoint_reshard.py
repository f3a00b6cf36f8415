"""When a resume goes through a universal checkpoint (checkpoint/reshard.py). The conversions themselves run
with real processes in test_distributed.py (ZeRO-1/2/3 on 1 and 3 processes, DDP <-> ZeRO)."""

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from mpnet_dist.checkpoint import TrainState
from mpnet_dist.checkpoint.reshard import needs_conversion


def _accelerator(stage: int, processes: int) -> SimpleNamespace:
    kind = DistributedType.DEEPSPEED if stage else DistributedType.MULTI_CPU
    plugin = SimpleNamespace(zero_stage=stage)
    return SimpleNamespace(
        distributed_type=kind, num_processes=processes, state=SimpleNamespace(deepspeed_plugin=plugin)
    )


@pytest.mark.parametrize(
    "saved, now, converted",
    [
        ((0, 2), (0, 2), False),  # DDP: loads as it is on any process count
        ((0, 2), (0, 3), False),
        ((0, 2), (2, 2), True),  # DDP -> ZeRO: the ZeRO optimizer needs its own layout
        ((2, 2), (2, 2), False),  # the same stage and process count: the normal load
        ((2, 2), (2, 1), True),  # ZeRO shards are split by process count
        ((2, 2), (3, 2), True),  # and laid out per stage
        ((3, 2), (0, 2), True),  # ZeRO -> DDP
    ],
)
def test_only_what_cannot_load_as_it_is_is_converted(saved, now, converted):
    state = TrainState(
        step=3, model_config={}, tokenizer_name="tok", zero_stage=saved[0], world_size=saved[1]
    )
    assert needs_conversion(state, _accelerator(*now)) is converted
