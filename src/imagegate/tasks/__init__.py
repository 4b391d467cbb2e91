"""Durable async tasks: rows in the tasks table, run by workers that hold them under a lease."""
