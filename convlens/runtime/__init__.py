"""Executes plans. Imports neither lark nor the AST: the plan is its only input."""
