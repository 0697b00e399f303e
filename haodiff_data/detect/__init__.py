"""HMB detection: detector data from shards, a YOLO11 detector, and HMB-R.

``export`` turns shards into an ultralytics dataset; ``train`` and ``predict`` run the detector;
``hmbr`` measures how many HMB instances survive restoration. Only ``yolo`` imports ultralytics
(AGPL-3.0), and only when a detection command runs.
"""
