"""What a solve gives users: the plan and its file format (`plan`), the
classic plans it is compared with (`classic`) and the HTML report (`report`)."""
