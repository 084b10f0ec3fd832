"""Spend and usage per key, and the budgets that stop a key (see edge.budgets.accounts)."""
