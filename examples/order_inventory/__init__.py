"""Order, inventory and payment: three services with their own databases, one event chain.

See README.md beside this file. Each service module exposes a module-level `app` for
`txflow run examples.order_inventory.<service>:app` and a `create_app(...)` factory for
running all three in one process (`python -m examples.order_inventory.demo`).
"""
