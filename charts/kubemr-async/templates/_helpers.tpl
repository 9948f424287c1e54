{{/*
Naming and labels, following `helm create` conventions.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "kubemr-async.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, used as the prefix of every object. Truncated to 63 characters
(DNS label limit) less room for the longest suffix we append ("-task-namespaces", 16).
*/}}
{{- define "kubemr-async.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "kubemr-async.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "kubemr-async.labels" -}}
helm.sh/chart: {{ include "kubemr-async.chart" . }}
{{ include "kubemr-async.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubemr-async
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: immutable on a Deployment, so only name, instance and component.
(The operator labels its worker objects app.kubernetes.io/component=worker; "operator"
keeps the two apart.)
*/}}
{{- define "kubemr-async.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubemr-async.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "kubemr-async.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubemr-async.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image reference. */}}
{{- define "kubemr-async.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
The S3 credentials Secret (in the release namespace), or "" when none is used.
Fails when only one of accessKeyId/secretAccessKey is given.
*/}}
{{- define "kubemr-async.s3SecretName" -}}
{{- if .Values.s3.existingSecret }}
{{- .Values.s3.existingSecret }}
{{- else if and .Values.s3.accessKeyId .Values.s3.secretAccessKey }}
{{- printf "%s-s3" (include "kubemr-async.fullname" .) }}
{{- else if or .Values.s3.accessKeyId .Values.s3.secretAccessKey }}
{{- fail "s3.accessKeyId and s3.secretAccessKey must be given together (or use s3.existingSecret)" }}
{{- end }}
{{- end }}

{{/*
RBAC rules the operator needs in every namespace holding MapReduceJobs: all namespaces
(ClusterRole) by default, only watchNamespace (Role) in namespaced mode. Each verb is one
the operator calls (kubemr_async/operator.py, kubemr_async/state/kube.py), except where a
comment says it is only held to be granted: the API server lets the operator create a Role
(or bind one) only if it holds every permission in it itself, and it gives each job's
workers a Role on their MapReduceJob (get/list/watch/patch on it and its status).
*/}}
{{- define "kubemr-async.rules.jobNamespace" -}}
# Watch jobs, read one, add/remove the finalizer, delete it after ttlSecondsAfterFinished.
- apiGroups: ["kubemr.io"]
  resources: ["mapreducejobs"]
  verbs: ["get", "list", "watch", "patch", "delete"]
# Plan, record progress and verdicts (patch); get/list/watch only to grant them to workers.
- apiGroups: ["kubemr.io"]
  resources: ["mapreducejobs/status"]
  verbs: ["get", "list", "watch", "patch"]
# Each job's workers: a ServiceAccount, a Role + RoleBinding, a batch Job. The job's
# owned objects go by garbage collection, so no delete except on the batch Job.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["create"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["create"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "create", "delete"]
# Detect worker pods that can never start (image pull errors).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# get: a job's own credentials Secret, by the name in its spec.storage, to plan (list its
# inputs) with the tenant's keys rather than the platform's; never listed or watched.
# create: the copy of the platform's S3 Secret, only in namespaces matching
# tenancy.platformCredentialsNamespaces.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/*
RBAC rules for the per-job task namespaces. Their names are made up per job, so these are
cluster-wide in both modes.
*/}}
{{- define "kubemr-async.rules.taskNamespaces" -}}
# Create a job's task namespace, wait out a terminating one (get), delete it at the end.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "create", "delete"]
# Plan the task records; get/list/watch/patch are also granted on to the workers.
- apiGroups: ["kubemr.io"]
  resources: ["mapreducetasks"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The workers' Role + RoleBinding in the task namespace.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["create"]
{{- end }}

{{/* The leader election Lease's name (in the release namespace). */}}
{{- define "kubemr-async.leaseName" -}}
{{- printf "%s-leader" (include "kubemr-async.fullname" .) }}
{{- end }}
