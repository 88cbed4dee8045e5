"""SyncBatchNorm outside a process group is exactly BatchNorm; conversion keeps the parameters the optimizer holds.
(Across ranks it is tested end to end in test_distributed: two ranks of batch B train like one of batch 2B.)"""
import copy

import torch
from torch import nn

from hat.engine.sync_bn import SyncBatchNorm, convert_sync_batchnorm
from hat.models import create_model


def test_alone_it_is_batch_norm_in_training_and_eval():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    assert isinstance(synced[1], SyncBatchNorm)
    x = torch.randn(8, 1, 6, 6)
    for model in (plain, synced):
        model(x).square().sum().backward()
    assert torch.equal(plain(x), synced(x))
    assert torch.equal(plain[0].weight.grad, synced[0].weight.grad)
    assert torch.equal(plain[1].running_var, synced[1].running_var)
    plain.eval(), synced.eval()
    assert torch.equal(plain(x), synced(x))


def test_conversion_keeps_parameter_objects_and_checkpoint_keys():
    model = create_model("convnet_small")
    params, keys = [id(p) for p in model.parameters()], list(model.state_dict())
    convert_sync_batchnorm(model)
    assert [id(p) for p in model.parameters()] == params
    assert list(model.state_dict()) == keys
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
