"""Flows (sagas): the declared model, the tracker's state machine and the flow queries.

`_model` declares flows and their steps; `_tracker` keeps each instance's state in the
tracking app's database and requests compensations; `_queries` reads instances for
`txflow flows` and the console.
"""
