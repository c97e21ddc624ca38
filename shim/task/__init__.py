"""The task domain: the containers and processes of one pod, their stdio, their events."""
