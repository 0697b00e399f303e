"""MPII-Test: crops of annotated people from MPII Human Pose, selected by the rules in
``pipelines/mpii_test.yaml`` (HAODiff Sec. 4.1: OSDHuman's selection minus its quality filter)."""
