"""Argument groups: each declares its flags once and builds the API object they describe.

A verb subscribes to a group by decorating itself with it (`@DataArgs(batch_size=128)`
adds --dataset, --limit, ...); click hands the parsed values to the verb, which passes
them to `group.build(flags)` and gets a Dataset, a list of Attacks, a RobustnessCheck or
a ConvertOptions back. The verb itself then makes one API call and renders the result.
"""
