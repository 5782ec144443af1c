"""Relevance of a prompt's tokens, layers and heads for a target continuation (docs/design.md §7).

- :mod:`.methods`: captum's methods and LRP behind one ``attribute`` call, axiom checks, faithfulness;
- :mod:`.lrp`: the CP-LRP and AttnLRP rules, applied to one model instance and removed on exit;
- :mod:`.options`: the methods, IG's budgets and size limits (no torch: the CLI's parser reads them).
"""
