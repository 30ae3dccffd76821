"""Gristmill labeling service: projects, import with cleaning, tasks and annotations, agreement, datasets."""
